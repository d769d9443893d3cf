r"""Multi-node GPU jobs under SLURM: the sbatch script, submitted.

  launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --job=pretrain \
    --flagfile=experiments/configs/small_cpu.flags --workdir=/shared/runs/r1 \
    [--per=gpu|node] [--partition=P] [--account=A] [--time=24:00:00] [--dry-run] [-- JOB FLAGS]

The script (written to --log_dir and given to `sbatch --parsable`; `--dry-run` prints it and the
sbatch command and writes nothing):
1. installs once, on the first node: a venv (--venv, default this checkout's .venv) and
   `pip install -e '.[cuda]'`; SLURM clusters mount the checkout and the venv on every node,
   so this is "install on all workers" (--noinstall skips it);
2. `srun --kill-on-bad-exit=1 python -m launch.worker --job=JOB -- --flagfile=... --workdir=...`:
   one process per GPU (--per=gpu, the default: each sees only its own GPU) or per node, every
   one finding its rank, the process count and the coordinator (the first node) in SLURM's
   variables through launch.worker, the entry launch/local.py runs on CPU.

Checked before anything is submitted, each failure one line and exit 2: sbatch on PATH, the job
and flagfile, node and GPU counts, a single-process job on several processes, and the workdir
(writable here: the login node sees the shared filesystem; gs:// gets a probe object).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence

from experiments.flag_errors import ArgumentParser, exit_on_bad_input
from launch import common
from launch.worker import MULTI_PROCESS_JOBS


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = ArgumentParser(
    prog="launch/gpu_slurm.sh",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--job", required=True, help="experiments/<job>.py, e.g. pretrain")
  parser.add_argument("--flagfile", required=True, help="the job's flagfile")
  parser.add_argument("--workdir", help="the job's --workdir: a shared path or gs://")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per")
  parser.add_argument("--name", help="SLURM job name (default r1jax-JOB)")
  parser.add_argument("--partition")
  parser.add_argument("--account")
  parser.add_argument("--time", help="wall-time limit, e.g. 24:00:00")
  parser.add_argument("--venv", default=os.path.join(common.ROOT, ".venv"))
  parser.add_argument("--noinstall", action="store_true", help="use the venv as it is")
  parser.add_argument("--log_dir", default=os.path.join(common.ROOT, "runs", "slurm"))
  parser.add_argument("--port", type=int, help="coordinator port (default: from the job id)")
  parser.add_argument("--project", help="GCP project for the gs:// workdir probe")
  parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
  return parser.parse_args(argv)


def _check(args) -> int:
  """Exits 2 on bad input; returns the job's process count."""
  for name in ("nodes", "gpus_per_node"):
    if getattr(args, name) < 1:
      exit_on_bad_input(f"--{name}: must be at least 1, got {getattr(args, name)}")
  common.check_job_and_flagfile(args.job, args.flagfile)
  processes = args.nodes * (args.gpus_per_node if args.per == "gpu" else 1)
  if processes > 1 and args.job not in MULTI_PROCESS_JOBS:
    exit_on_bad_input(
      f"--job: {args.job} runs in one process, not {processes}; use --nodes=1 --per=node "
      f"(multi-process jobs: {', '.join(MULTI_PROCESS_JOBS)})"
    )
  if not args.dry_run:
    common.require_tool("sbatch", "run this on the cluster's login node")
  workdir = args.workdir or common.flagfile_value(args.flagfile, "workdir")
  if workdir and not workdir.startswith("gs://"):
    common.check_local_workdir(workdir)
  return processes


def sbatch_script(args, job_flags: Sequence[str]) -> str:
  """The batch script: #SBATCH header, the install, then srun of launch.worker."""
  per_gpu = args.per == "gpu"
  header = {
    "job-name": args.name or f"r1jax-{args.job}",
    "nodes": args.nodes,
    "ntasks-per-node": args.gpus_per_node if per_gpu else 1,
    "gpus-per-node": args.gpus_per_node,
    "output": os.path.join(os.path.abspath(args.log_dir), "%x-%j.out"),
    "partition": args.partition,
    "account": args.account,
    "time": args.time,
  }
  python = os.path.join(os.path.abspath(args.venv), "bin", "python")
  lines = ["#!/bin/bash"]
  lines += [f"#SBATCH --{key}={value}" for key, value in header.items() if value is not None]
  lines += ["set -euo pipefail", f"cd {shlex.quote(common.ROOT)}"]
  if not args.noinstall:
    lines += [
      "# Once, on the first node: every node mounts this checkout and the venv.",
      f"[ -x {shlex.quote(python)} ] || python3.11 -m venv {shlex.quote(os.path.abspath(args.venv))}",
      f"{shlex.quote(python)} -m pip install --quiet -e '.[cuda]'",
    ]
  worker = [python, "-m", "launch.worker", f"--job={args.job}"]
  worker += ["--device_per_process"] if per_gpu else []
  worker += [f"--port={args.port}"] if args.port else []
  flags = [f"--flagfile={os.path.abspath(args.flagfile)}"]
  flags += [f"--workdir={args.workdir}"] if args.workdir else []
  lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *worker, "--", *flags, *job_flags]))
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str], out=None) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parse_args(argv[:split])
  processes = _check(args)
  out = out or sys.stdout
  runner = common.Runner(args.dry_run, out)
  if args.workdir and args.workdir.startswith("gs://"):
    common.require_tool("gcloud", "it checks that the gs:// workdir is writable")
    common.check_gcs_workdir(args.workdir, runner, args.project)
  script = sbatch_script(args, argv[split + 1 :])
  name = f"{args.name or 'r1jax-' + args.job}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
  path = os.path.join(os.path.abspath(args.log_dir), name)
  runner.note(f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s), {processes} process(es)")
  if args.dry_run:
    runner.note(f"the batch script, {path}:")
    out.write(script)
  else:
    os.makedirs(args.log_dir, exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
  try:
    job_id = runner.run(["sbatch", "--parsable", path], capture=True).strip().split(";")[0]
  except common.LaunchError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  if not args.dry_run:
    log = os.path.join(
      os.path.abspath(args.log_dir), f"{args.name or 'r1jax-' + args.job}-{job_id}.out"
    )
    print(f"submitted job {job_id}; its log: {log} (follow with: tail -F {log})", file=out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
