r"""Cloud TPU VMs and pod slices: create, copy and install r1jax on every worker, run, delete.

  launch/tpu.sh --name=r1 --zone=us-east5-a --accelerator=v5p-16 --job=pretrain \
    --flagfile=experiments/configs/tiny_cpu.flags --workdir=gs://BUCKET/runs/r1 \
    [--project=P] [--runtime=VERSION] [--spot] [--delete-after] [--dry-run] [-- JOB FLAGS]

Steps, each one `gcloud` command (`--dry-run` prints them all and runs nothing):
1. `compute tpus queued-resources create` (spot with --spot), then `describe` every
   --poll_seconds until the slice is ACTIVE (FAILED or SUSPENDED stop the launch);
2. `compute tpus tpu-vm scp --worker=all` of a tarball of this checkout (the files git tracks,
   plus untracked ones it does not ignore) and the flagfile;
3. `tpu-vm ssh --worker=all`: unpack into ~/r1jax, a Python 3.11 venv (uv fetches 3.11 where
   the image has another), `pip install -e '.[tpu]'`;
4. `tpu-vm ssh --worker=all`: `python -m launch.worker --job=JOB -- --flagfile=... --workdir=...`
   on every worker at once, its output streaming here; JAX finds the slice's other hosts itself;
5. with --delete-after, `queued-resources delete` (also when a step failed).

Checked before anything is created, each failure one line and exit 2: gcloud on PATH, the
accelerator type (generation and size), the name, the job and flagfile, a workdir every worker
can reach on a multi-host slice (gs://, or an absolute path such as a gcsfuse mount), and a gs://
workdir's writability (a probe object written and removed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from experiments.flag_errors import ArgumentParser, exit_on_bad_input
from launch import common
from launch.worker import MULTI_PROCESS_JOBS

REMOTE_DIR = "r1jax"  # under each worker's home
REMOTE_VENV = "r1jax-venv"
REMOTE_FLAGFILE = "launch.flags"  # the flagfile's name on the workers, inside REMOTE_DIR


@dataclass(frozen=True)
class Generation:
  runtime: str  # the software version Cloud TPU documents for JAX on this generation
  per_chip: int  # the name's number counts TensorCores (2 per chip) or chips (1)
  chips_per_host: int
  sizes: tuple[int, ...] | None  # allowed sizes; None: any multiple of 8
  single_host_max: int  # chips a one-host slice may have


GENERATIONS = {
  "v2": Generation("tpu-ubuntu2204-base", 2, 4, (8, 32, 128, 256, 512), 4),
  "v3": Generation("tpu-ubuntu2204-base", 2, 4, (8, 32, 64, 128, 256, 512, 1024, 2048), 4),
  "v4": Generation("tpu-ubuntu2204-base", 2, 4, None, 4),
  "v5p": Generation("v2-alpha-tpuv5", 2, 4, None, 4),
  "v5litepod": Generation("v2-alpha-tpuv5-lite", 1, 4, (1, 4, 8, 16, 32, 64, 128, 256), 8),
  "v6e": Generation("v2-alpha-tpuv6e", 1, 4, (1, 4, 8, 16, 32, 64, 128, 256), 8),
}


@dataclass(frozen=True)
class Slice:
  accelerator: str
  generation: str
  chips: int
  hosts: int


def parse_accelerator(accelerator: str) -> Slice:
  """ "v5p-16" -> 8 chips on 2 hosts. Exits 2 naming --accelerator on an unknown type."""
  known = ", ".join(f"{g}-N" for g in GENERATIONS)
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
  gen = GENERATIONS.get(m[1]) if m else None
  if gen is None:
    exit_on_bad_input(f"--accelerator: unknown type {accelerator!r}; known: {known}")
  size = int(m[2])
  allowed = size in gen.sizes if gen.sizes else size > 0 and size % 8 == 0
  if not allowed:
    sizes = ", ".join(map(str, gen.sizes)) if gen.sizes else "multiples of 8"
    exit_on_bad_input(f"--accelerator: {accelerator} is not a {m[1]} slice size ({sizes})")
  chips = size // gen.per_chip
  hosts = 1 if chips <= gen.single_host_max else chips // gen.chips_per_host
  return Slice(accelerator, m[1], chips, hosts)


def parse_args(argv: Sequence[str]):
  parser = ArgumentParser(
    prog="launch/tpu.sh",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--name", required=True, help="TPU (and queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--accelerator", required=True, help="e.g. v5p-16, v6e-8, v4-32")
  parser.add_argument("--job", required=True, help="experiments/<job>.py, e.g. pretrain")
  parser.add_argument("--flagfile", required=True, help="the job's flagfile (copied over)")
  parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  parser.add_argument("--workdir", help="the job's --workdir; gs:// on multi-host slices")
  parser.add_argument("--runtime", help="TPU software version (default: per generation)")
  parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  parser.add_argument("--delete-after", action="store_true", help="delete the TPU at the end")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
  parser.add_argument("--poll_seconds", type=float, default=30.0, help="state polling period")
  parser.add_argument("--wait_minutes", type=float, default=120.0, help="give up after this")
  return parser.parse_args(argv)


def _check(args) -> Slice:
  tpu = parse_accelerator(args.accelerator)
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
    exit_on_bad_input(f"--name: {args.name!r} must be lowercase letters, digits and hyphens")
  common.check_job_and_flagfile(args.job, args.flagfile)
  if tpu.hosts > 1 and args.job not in MULTI_PROCESS_JOBS:
    exit_on_bad_input(
      f"--job: {args.job} runs in one process; a {tpu.accelerator} slice has {tpu.hosts} "
      f"workers (multi-host jobs: {', '.join(MULTI_PROCESS_JOBS)})"
    )
  workdir = args.workdir or common.flagfile_value(args.flagfile, "workdir")
  if tpu.hosts > 1 and not (workdir and (workdir.startswith("gs://") or workdir.startswith("/"))):
    exit_on_bad_input(
      f"--workdir: a {tpu.accelerator} slice has {tpu.hosts} workers that must write one run; "
      f"give a gs:// workdir (or an absolute path on a shared mount), got {workdir!r}"
    )
  if not args.dry_run:
    common.require_tool("gcloud", "install the Google Cloud CLI (cloud.google.com/sdk)")
  if args.poll_seconds <= 0 or args.wait_minutes <= 0:
    exit_on_bad_input("--poll_seconds and --wait_minutes: must be positive")
  return tpu


def code_tarball(flagfile: str, destination: str) -> None:
  """This checkout's files (git's tracked and unignored untracked) and the flagfile, gzipped."""
  listed = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    cwd=common.ROOT,
    capture_output=True,
    check=False,
  )
  if listed.returncode != 0:
    raise common.LaunchError(f"git ls-files in {common.ROOT} failed: {listed.stderr.decode()}")
  with tarfile.open(destination, "w:gz") as tar:
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
      if os.path.isfile(os.path.join(common.ROOT, name)):
        tar.add(os.path.join(common.ROOT, name), arcname=name)
    tar.add(flagfile, arcname=REMOTE_FLAGFILE)


def remote_commands(args, job_flags: Sequence[str]) -> tuple[str, str]:
  """(install, run): the shell lines every worker runs ($HOME: `~` would not expand in `--x=~`)."""
  home = f"$HOME/{REMOTE_DIR}"
  unpack = f"rm -rf {home} && mkdir -p {home} && tar -xzf {home}.tar.gz -C {home}"
  venv = f"$HOME/{REMOTE_VENV}"
  install = " && ".join(
    [
      "set -e",
      unpack,
      f"cd {home}",
      "python3 -m pip install --user --quiet uv",
      f"python3 -m uv venv --python=3.11 {venv}",
      f"python3 -m uv pip install --python={venv}/bin/python -e '.[tpu]'",
    ]
  )
  flags = [f"--flagfile={REMOTE_FLAGFILE}"]
  if args.workdir:
    flags.append(f"--workdir={args.workdir}")
  worker = [f"{venv}/bin/python", "-m", "launch.worker", f"--job={args.job}", "--"]
  # $HOME must stay unquoted for the remote shell to expand it.
  run = f"cd {home} && " + " ".join(
    [*worker[:1], *map(shlex.quote, [*worker[1:], *flags, *job_flags])]
  )
  return install, run


def _wait_active(runner: common.Runner, args, scope: list[str]) -> None:
  describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *scope]
  describe.append("--format=value(state.state)")
  if runner.dry_run:
    runner.note(f"repeated every {args.poll_seconds:g} s until the state is ACTIVE:")
    runner.run(describe)
    return
  deadline = time.monotonic() + args.wait_minutes * 60
  while True:
    state = runner.run(describe, capture=True).strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED"):
      raise common.LaunchError(f"the queued resource {args.name} is {state}")
    if time.monotonic() > deadline:
      raise common.LaunchError(f"{args.name} not ACTIVE after {args.wait_minutes:g} min ({state})")
    print(f"{args.name}: {state or 'no state yet'}; waiting", flush=True)
    time.sleep(args.poll_seconds)


def main(argv: Sequence[str], out=None) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parse_args(argv[:split])
  tpu = _check(args)
  runner = common.Runner(args.dry_run, out)
  scope = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  if args.workdir and args.workdir.startswith("gs://"):
    runner.note(f"the workdir {args.workdir} must be writable")
    common.check_gcs_workdir(args.workdir, runner, args.project)
  runtime = args.runtime or GENERATIONS[tpu.generation].runtime
  install, run = remote_commands(args, argv[split + 1 :])
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *scope, "--worker=all"]
  created, code = False, 0
  with tempfile.TemporaryDirectory() as tmp:
    try:
      runner.note(f"create {tpu.accelerator}: {tpu.chips} chips on {tpu.hosts} host(s)")
      create = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name]
      create += [f"--node-id={args.name}", *scope, f"--accelerator-type={tpu.accelerator}"]
      create += [f"--runtime-version={runtime}"] + (["--spot"] if args.spot else [])
      runner.run(create)
      created = True
      _wait_active(runner, args, scope)
      runner.note("copy this checkout and the flagfile to every worker")
      tarball = os.path.join(tmp, f"{REMOTE_DIR}.tar.gz")
      if not runner.dry_run:
        code_tarball(args.flagfile, tarball)
      scp = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        tarball,
        f"{args.name}:{REMOTE_DIR}.tar.gz",
      ]
      runner.run([*scp, *scope, "--worker=all"])
      runner.note("install on every worker")
      runner.run([*ssh, f"--command={install}"])
      runner.note(f"run {args.job} on every worker")
      runner.run([*ssh, f"--command={run}"])
    except common.LaunchError as err:
      print(f"error: {err}", file=sys.stderr)
      code = 1
    finally:
      if args.delete_after and created:
        runner.note(f"delete {args.name}")
        delete = ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *scope]
        try:
          runner.run([*delete, "--force", "--quiet"])
        except common.LaunchError as err:
          print(f"error: {err}; delete it by hand", file=sys.stderr)
          code = code or 1
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
