"""Runs an entry point as users do, `python -m MODULE ARGS`, in a child process on the CPU."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, timeout: int = 120, **env: str):
  """The CompletedProcess (text stdout/stderr) of `python -m module args` from the repo root."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
  )
