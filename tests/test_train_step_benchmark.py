"""experiments.benchmarks.train_step: its library call on the tiny preset, both sides, one step."""

import re

import pytest

from experiments.benchmarks import train_step


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tiny_run_trains_the_same_model_and_ends_with_the_ratio(scan_layers):
  """r1jax's layers unrolled (the benchmark's default: the stacked initial state is unrolled
  for it) or scanned."""
  cfg = train_step.benchmark_config("tiny", scan_layers=scan_layers)
  lines = []
  result = train_step.run(
    cfg, batch=2, seq=16, steps=1, warmup=1, vs_hf=True, peak=False, log=lines.append
  )
  assert re.fullmatch(r"r1jax/hf tokens/s ratio: \d+\.\d\d", lines[-1]), lines
  assert result["ratio"] == pytest.approx(result["hf"] / result["r1jax"])
  assert float(lines[-1].split(": ")[1]) == pytest.approx(result["ratio"], abs=0.005)
  # Same weights (r1jax.hf.save -> from_pretrained) and same batch: the same first-step loss.
  losses = re.fullmatch(r"first-step LM loss: r1jax (\S+), hf (\S+)", lines[-4])
  assert losses, lines
  assert float(losses[1]) == pytest.approx(float(losses[2]), rel=1e-4)
  for line, side in zip(lines[-3:-1], ("r1jax", "hf"), strict=True):
    assert re.match(rf" *{side}: +\d+\.\d+ s/step +\d+\.\d tokens/s", line), lines
