r"""The per-process entry of every launcher: where this process sits in the job, then the job.

  python -m launch.worker --job=pretrain -- --flagfile=experiments/configs/tiny_cpu.flags

`launch/local.py` (N processes on this machine), `launch/slurm.py` (srun, one process per GPU or
per node) and `launch/tpu.py` (every worker of a Cloud TPU slice) all start this module, so the
multi-host path of a cluster is the one the CPU tests run. It settles the R1JAX_* variables that
`r1jax.distributed.initialize` reads, then replaces itself (exec, same PID: a preemption's SIGTERM
reaches the job) with `python -m experiments.<job> FLAGS`. Where the settings come from, first
match wins:

1. R1JAX_COORDINATOR_ADDRESS, R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID already set (launch.local).
2. SLURM (srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_STEP_NODELIST or SLURM_JOB_NODELIST): the
   coordinator is the first node of the step, on --port (default: derived from SLURM_JOB_ID, so
   two jobs sharing a node do not collide). With --device_per_process, process i uses only the
   GPU SLURM_LOCALID (R1JAX_LOCAL_DEVICE_IDS).
3. Nothing (a TPU VM, or one process): left to `r1jax.distributed.initialize`, which lets JAX
   read a multi-host TPU slice from its metadata and otherwise runs single-process.

A multi-process CPU job compiles without the persistent compilation cache (see `main`). Bad
input exits 2 with one line, before the job starts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence

from experiments.flag_errors import ArgumentParser, exit_on_bad_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Jobs that join a multi-process runtime (jax.distributed); the others are single-process.
MULTI_PROCESS_JOBS = ("pretrain", "sft")
_PORT_BASE, _PORT_SPAN = 20000, 20000


def known_job(job: str) -> bool:
  """Whether experiments/<job>.py exists (dots for subpackages: benchmarks.train_step)."""
  if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", job):
    return False
  return os.path.isfile(os.path.join(ROOT, "experiments", *job.split(".")) + ".py")


def expand_nodelist(nodelist: str) -> list[str]:
  """SLURM's compressed host list -> host names, in order.

  "gpu[001-003,7],login1" -> ["gpu001", "gpu002", "gpu003", "gpu7", "login1"] (zero padding kept).
  """
  hosts = []
  for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]*)\]|([^,\[\]]+)", nodelist):
    if plain:
      hosts.append(plain)
      continue
    for part in ranges.split(","):
      lo, _, hi = part.partition("-")
      if not hi:
        hosts.append(prefix + lo)
        continue
      hosts.extend(prefix + str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
  return hosts


def job_environment(
  environ: Mapping[str, str], port: int | None = None, device_per_process: bool = False
) -> dict[str, str]:
  """The R1JAX_* settings for this process (empty: single process, or JAX's own detection).

  Raises:
    ValueError: a SLURM job whose node list or task ids cannot be read (names the variable).
  """
  if environ.get("R1JAX_COORDINATOR_ADDRESS"):
    return {}  # set by the launcher (launch.local): nothing to add
  if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
    return {}
  name = "SLURM_STEP_NODELIST" if environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
  hosts = expand_nodelist(environ.get(name, ""))
  if not hosts:
    raise ValueError(f"{name}: empty or unreadable ({environ.get(name)!r}); run under srun")
  if port is None:
    port = _PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % _PORT_SPAN
  settings = {
    "R1JAX_COORDINATOR_ADDRESS": f"{hosts[0]}:{port}",
    "R1JAX_NUM_PROCESSES": environ["SLURM_NTASKS"],
    "R1JAX_PROCESS_ID": environ["SLURM_PROCID"],
  }
  if device_per_process:
    settings["R1JAX_LOCAL_DEVICE_IDS"] = environ.get("SLURM_LOCALID", "0")
  return settings


def check_job(job: str) -> None:
  """Exits 2 unless experiments/<job>.py exists."""
  if not known_job(job):
    exit_on_bad_input(f"--job: unknown {job!r}; expected a module experiments/<job>.py")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = ArgumentParser(
    prog="python -m launch.worker",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--job", required=True, help="experiment to run: experiments/<job>.py")
  parser.add_argument("--port", type=int, help="coordinator port under SLURM")
  parser.add_argument(
    "--device_per_process", action="store_true", help="SLURM: one GPU per process"
  )
  args = parser.parse_args(argv)
  check_job(args.job)
  if args.port is not None and not 0 < args.port < 65536:
    exit_on_bad_input(f"--port: must be in 1..65535, got {args.port}")
  return args


def main(argv: Sequence[str]) -> None:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parse_args(argv[:split])
  try:
    settings = job_environment(os.environ, args.port, args.device_per_process)
  except ValueError as err:
    exit_on_bad_input(str(err))
  processes = int(settings.get("R1JAX_NUM_PROCESSES", os.environ.get("R1JAX_NUM_PROCESSES", "1")))
  if processes > 1 and args.job not in MULTI_PROCESS_JOBS:
    exit_on_bad_input(
      f"--job: {args.job} runs in one process, this job has {processes}; "
      f"multi-process jobs: {', '.join(MULTI_PROCESS_JOBS)}"
    )
  env = {**os.environ, **settings}
  if processes > 1 and env.get("JAX_PLATFORMS", "").startswith("cpu"):
    # Gloo gives a peer 30 s to join each collective's context: a process that loads a cached
    # executable while another compiles (one cache hit, one miss) fails the job. Compile all.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  command = [sys.executable, "-m", f"experiments.{args.job}", *argv[split + 1 :]]
  sys.stdout.flush()
  os.execve(sys.executable, command, env)


if __name__ == "__main__":
  main(sys.argv[1:])
