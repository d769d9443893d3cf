"""The other benchmarks run end to end at toy sizes (their figures come from full-size runs)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "module, args, last",
  [
    (
      "moe_layer",
      ["--tokens=64", "--d_model=32", "--d_ff=16", "--experts=8", "--top_k=2", "--reps=1"]
      + ["--impls=xla,reference"],
      "xla dropless forward: ",
    ),
    ("moe_dispatch", ["--preset=cpu", "--impls=xla", "--reps=1"], "xla "),
    pytest.param(
      "hf_load_memory", ["--preset=tiny"], "load peak = model + ", marks=pytest.mark.slow
    ),
  ],
)
def test_benchmark_runs_and_reports(module, args, last):
  proc = subprocess.run(
    [sys.executable, "-m", f"experiments.benchmarks.{module}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(last), proc.stdout
