r"""Runs an experiment as a multi-process job on this machine: N CPU processes, D fake devices each.

  python -m launch.local --num_processes=2 --devices_per_process=4 --job=pretrain -- \
    --preset=tiny --num_steps=3 --mesh=data=2,expert=4

Launcher flags come before `--`; everything after it goes unchanged to every process's
`python -m launch.worker --job=<job> -- ...` (the per-process entry the cluster launchers use
too), which runs `python -m experiments.<job>` with them, a `--flagfile=FILE` included (after `--`: the launcher itself takes
only the four flags that `--help` lists). Process i gets JAX_PLATFORMS=cpu, XLA_FLAGS with
--xla_force_host_platform_device_count=D (replacing any such flag already there, keeping the
rest) and the R1JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), R1JAX_NUM_PROCESSES and
R1JAX_PROCESS_ID variables that `r1jax.distributed.initialize` reads (collectives over gloo).

Each process's output (stdout and stderr together) is printed line by line as `[i] line`. The
launcher exits 0 when all processes do. When one fails, it stops the others (they would wait in
a collective forever), says which failed on stderr and exits with that process's code (128+N
for a process killed by signal N). --timeout=SECONDS kills all processes and exits 124. Bad
launcher flags print one line `error: ...` and exit 2 before anything starts.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from experiments.flag_errors import ArgumentParser, exit_on_bad_input
from launch.worker import MULTI_PROCESS_JOBS, check_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT_EXIT = 124
_GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping processes


def free_port() -> int:
  """A port nothing listens on now (the OS picks it; another program could still take it)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_env(
  process_id: int, num_processes: int, devices: int, port: int, base: dict[str, str]
) -> dict[str, str]:
  """The environment of process `process_id`: `base` plus the CPU and multi-process settings."""
  xla_flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  return {
    **base,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": " ".join([*xla_flags, f"{_DEVICE_COUNT_FLAG}={devices}"]),
    "R1JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    "R1JAX_NUM_PROCESSES": str(num_processes),
    "R1JAX_PROCESS_ID": str(process_id),
    "PYTHONPATH": os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH")) if p),
    "PYTHONUNBUFFERED": "1",  # lines as they are printed, not when a pipe buffer fills
  }


def _stream(index: int, pipe, lock: threading.Lock, out) -> None:
  for line in pipe:
    with lock:
      out.write(f"[{index}] {line.rstrip(chr(10))}\n")
      out.flush()
  pipe.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to every live process, SIGKILL to those still alive after a grace period."""
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + _GRACE_S
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def run_processes(
  commands: Sequence[Sequence[str]],
  envs: Sequence[dict[str, str]],
  timeout: float | None = None,
  out=None,
) -> int:
  """Runs the commands at once, prefixing their output lines; returns the job's exit code.

  0 when every process exits 0. Otherwise the first failure's code (128+N for signal N) after
  stopping the rest, or 124 after `timeout` seconds, with one `error:` line on stderr.
  """
  out = out or sys.stdout
  lock = threading.Lock()
  procs, readers = [], []
  deadline = None if timeout is None else time.monotonic() + timeout
  code, message = 0, None
  try:
    for i, (command, env) in enumerate(zip(commands, envs, strict=True)):
      procs.append(
        subprocess.Popen(
          command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, errors="replace"
        )
      )
      readers.append(
        threading.Thread(target=_stream, args=(i, procs[-1].stdout, lock, out), daemon=True)
      )
      readers[-1].start()
    while code == 0:
      codes = [proc.poll() for proc in procs]
      failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is not None:
        code = codes[failed] if codes[failed] > 0 else 128 - codes[failed]
        message = f"process {failed} exited with code {codes[failed]}; stopped the other processes"
      elif all(c == 0 for c in codes):
        break
      elif deadline is not None and time.monotonic() > deadline:
        code, message = _TIMEOUT_EXIT, f"--timeout: killed all processes after {timeout:g} s"
      else:
        time.sleep(0.1)
  finally:  # also on KeyboardInterrupt or a failed start: leave no process behind
    _stop(procs)
    for reader in readers:
      reader.join(timeout=_GRACE_S)
  if message:
    print(f"error: {message}", file=sys.stderr)
  return code


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Launcher flags; exits 2 with one line naming the flag on bad input."""
  parser = ArgumentParser(
    prog="python -m launch.local",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--job", required=True, help="experiment to run: experiments/<job>.py")
  parser.add_argument("--num_processes", type=int, default=2, help="processes to start")
  parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices each")
  parser.add_argument("--timeout", type=float, help="kill all after this many seconds")
  args = parser.parse_args(argv)
  check_job(args.job)
  for name in ("num_processes", "devices_per_process"):
    if getattr(args, name) < 1:
      exit_on_bad_input(f"--{name}: must be at least 1, got {getattr(args, name)}")
  if args.num_processes > 1 and args.job not in MULTI_PROCESS_JOBS:
    exit_on_bad_input(
      f"--job: {args.job} runs in one process; multi-process jobs: {', '.join(MULTI_PROCESS_JOBS)}"
    )
  if args.timeout is not None and not args.timeout > 0:
    exit_on_bad_input(f"--timeout: must be positive seconds, got {args.timeout:g}")
  return args


def main(argv: Sequence[str]) -> int:
  """Runs `argv` (launcher flags, then `--` and the job's flags); returns the exit code."""
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parse_args(argv[:split])
  n, port = args.num_processes, free_port()
  command = [sys.executable, "-m", "launch.worker", f"--job={args.job}", "--", *argv[split + 1 :]]
  envs = [process_env(i, n, args.devices_per_process, port, dict(os.environ)) for i in range(n)]
  return run_processes([command] * n, envs, args.timeout)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
