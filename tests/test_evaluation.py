"""Held-out metrics against values counted by hand."""

import math

import numpy as np
import pytest

from r1jax.train.evaluation import pass_at_k, summarize
from tests.cli import run_module


def test_pass_at_k_estimator():
  assert pass_at_k(4, 0, 2) == 0.0
  assert pass_at_k(4, 3, 2) == 1.0  # any 2 of 4 include a correct one
  assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
  assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the correct fraction
  with pytest.raises(ValueError, match="^pass_at_k: need"):
    pass_at_k(3, 1, 4)


def test_summary_by_hand():
  correct = [[1, 0, 0, 1], [0, 0, 0, 0]]
  formed = [[1, 1, 0, 1], [1, 0, 0, 0]]
  think = [[1, 1, 1, 1], [0, 0, 0, 1]]
  lengths = [[10, 20, 30, 40], [5, 5, 5, 5]]
  got = summarize(correct, formed, think, lengths, greedy_correct=[1, 0])
  assert got["pass@1"] == pytest.approx(2 / 8)
  assert got["pass@k"] == pytest.approx((1.0 + 0.0) / 2)  # k = n = 4: any correct
  assert got["greedy_acc"] == 0.5
  assert got["format_rate"] == pytest.approx(4 / 8) and got["think_rate"] == pytest.approx(5 / 8)
  assert got["mean_length"] == pytest.approx(120 / 8)
  assert got["mean_length_correct"] == pytest.approx(25.0)
  assert got["mean_length_incorrect"] == pytest.approx((20 + 30 + 20) / 6)
  assert summarize(correct, formed, think, lengths, k=2)["pass@k"] == pytest.approx(
    (1 - math.comb(2, 2) / math.comb(4, 2)) / 2
  )
  none_right = summarize(np.zeros((1, 2)), [[1, 1]], [[1, 1]], [[3, 4]])
  assert math.isnan(none_right["mean_length_correct"]) and "greedy_acc" not in none_right


def test_evaluate_scores_reference_replies_from_a_model_that_cannot_answer():
  """A random tiny model answers nothing: every accuracy 0, lengths within the budget; the
  metrics all there and fractions."""
  import jax
  import jax.numpy as jnp
  from flax.linen import meta

  from r1jax import ModelConfig
  from r1jax.data.tasks import TASKS
  from r1jax.model import Transformer
  from r1jax.train.evaluation import evaluate

  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  got = evaluate(
    cfg, variables, TASKS["addition"], num_problems=3, samples=2, max_new_tokens=6, seed=1
  )
  assert got["pass@1"] == 0.0 and got["pass@k"] == 0.0 and got["greedy_acc"] == 0.0
  assert 1 <= got["mean_length"] <= 6
  for name in ("format_rate", "think_rate"):
    assert 0.0 <= got[name] <= 1.0


@pytest.mark.slow  # two child processes; evaluate() itself is tested above
def test_evaluate_cli_prints_the_metrics_and_names_bad_input(tmp_path):
  import json

  import jax
  import jax.numpy as jnp
  from flax.linen import meta

  from r1jax import ModelConfig
  from r1jax.checkpoint import save_weights
  from r1jax.model import Transformer

  cfg = ModelConfig.from_preset("tiny", dtype="float32")
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  save_weights(str(tmp_path / "w"), cfg, variables)

  def run(*flags):
    return run_module("experiments.evaluate", *flags, timeout=300)

  proc = run(
    f"--init_from={tmp_path / 'w'}", "--num_problems=2", "--samples=2", "--max_new_tokens=4"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["task"] == "addition" and got["pass@1"] == 0.0 and "greedy_acc" in got
  bad = run("--init_from=/nope")
  assert bad.returncode == 2 and bad.stderr.startswith("error: --init_from: /nope: not an r1jax")
