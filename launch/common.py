"""What the cluster launchers share: running or printing commands, and the checks made before
anything is created (tools on PATH, the job, the flagfile, a writable workdir)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from experiments.flag_errors import exit_on_bad_input
from launch.worker import check_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(Exception):
  """A step failed after checks passed; the message is one line naming the step."""


class Runner:
  """Runs commands, or with dry_run prints each as one shell line and runs nothing.

  Every command also goes to `self.log` (what a test or a dry run inspects).
  """

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.log: list[list[str]] = []

  def note(self, text: str) -> None:
    print(f"# {text}", file=self.out, flush=True)

  def run(self, command: Sequence[str], *, capture: bool = False, check: bool = True) -> str:
    """Runs `command` (output streams through unless captured); returns captured stdout."""
    command = [str(c) for c in command]
    self.log.append(command)
    if self.dry_run:
      print(shlex.join(command), file=self.out, flush=True)
      return ""
    proc = subprocess.run(command, capture_output=capture, text=True, check=False)
    if check and proc.returncode != 0:
      detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
      raise LaunchError(
        f"`{shlex.join(command[:4])} ...` exited with code {proc.returncode}"
        + (f": {detail[0]}" if detail else "")
      )
    return proc.stdout if capture else ""


def require_tool(name: str, why: str) -> None:
  """Exits 2 unless `name` is on PATH."""
  if shutil.which(name) is None:
    exit_on_bad_input(f"{name}: not found on PATH; {why}")


def check_job_and_flagfile(job: str, flagfile: str) -> None:
  check_job(job)
  if not os.path.isfile(flagfile):
    exit_on_bad_input(f"--flagfile: {flagfile} does not exist")


def flagfile_value(flagfile: str, name: str) -> str | None:
  """The last `--name=value` line of a flagfile (absl: the last one wins), or None."""
  value = None
  with open(flagfile) as f:
    for line in f:
      line = line.strip()
      if line.startswith(f"--{name}="):
        value = line.split("=", 1)[1]
  return value


def check_local_workdir(workdir: str) -> None:
  """Exits 2 unless a file can be created in `workdir`, or in the nearest directory above it
  that exists (a temporary file, removed at once; permission bits alone would pass root)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    exit_on_bad_input(f"--workdir: {workdir} is a file, not a directory")
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    exit_on_bad_input(f"--workdir: {workdir} lies under {probe}, a file; pick another")
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as err:
    exit_on_bad_input(
      f"--workdir: {workdir} is not writable ({probe}: {err.strerror}); pick another"
    )


def check_gcs_workdir(workdir: str, runner: Runner, project: str | None) -> None:
  """Writes and removes a probe object under a gs:// workdir; exits 2 if that fails."""
  target = workdir.rstrip("/") + "/.r1jax_write_check"
  extra = [f"--project={project}"] if project else []
  with tempfile.NamedTemporaryFile("w", suffix=".txt") as empty:
    try:
      runner.run(["gcloud", "storage", "cp", empty.name, target, *extra], capture=True)
      runner.run(["gcloud", "storage", "rm", target, *extra], capture=True)
    except LaunchError as err:
      exit_on_bad_input(f"--workdir: {workdir} is not writable ({err}); check the bucket and IAM")
