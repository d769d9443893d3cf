"""The other benchmarks run end to end at toy sizes (their figures come from full-size runs)."""

import os

import pytest

from tests.cli import run_module

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
    (
      "decode",
      ["--preset=tiny", "--contexts=16", "--steps=2", "--warmup=1", "--prefill_chunk=8"],
      "absorbed/naive tokens/s at 16: ",
    ),
    pytest.param(  # slow: four compiles; tests/test_token_merge.py covers what it measures
      "token_efficiency",
      ["--preset=tiny", "--seq=16", "--batch=2", "--ratios=0.25", "--steps=1", "--inflate_layer=2"]
      + ["--train_steps=3", "--train_seq=16", "--warmup=2"],
      "merge/off tokens/s ratio: ",
      marks=pytest.mark.slow,
    ),
    pytest.param(
      "hf_load_memory", ["--preset=tiny"], "load peak = model + ", marks=pytest.mark.slow
    ),
  ],
)
def test_benchmark_runs_and_reports(module, args, last):
  proc = run_module(f"experiments.benchmarks.{module}", *args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(last), proc.stdout
