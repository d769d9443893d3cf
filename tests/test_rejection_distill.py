"""experiments/rejection_sample.py and experiments/distill.py as a user runs them: a tiny model's
weights, sampled and kept; a student fine-tuned on samples, with its run record and metrics;
bad input exits 2 with one line and overwrites nothing."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from r1jax import ModelConfig, Transformer
from r1jax.checkpoint import save_weights
from r1jax.data.tasks import TASKS, sample_problems
from tests.cli import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A tiny model's weights directory (random init: it solves nothing, which is fine here)."""
  cfg = ModelConfig.from_preset("tiny", dtype="float32")
  variables = jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return save_weights(str(tmp_path_factory.mktemp("w") / "tiny"), cfg, variables)


def _run(job, *flags):
  return run_module(f"experiments.{job}", *flags, timeout=600)


def _samples(path, count=8):
  task = TASKS["addition"]
  rows = [
    {"prompt": p.prompt, "response": task.reference_completion(p, True)}
    for p in sample_problems(task, 0, "train", count)
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_rejection_sample_writes_the_kept_pairs_and_its_statistics(weights, tmp_path):
  out = tmp_path / "kept.jsonl"
  proc = _run(
    "rejection_sample",
    f"--init_from={weights}",
    "--num_problems=3",
    "--samples=2",
    "--max_new_tokens=8",
    f"--output={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  stats = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (stats["problems"], stats["samples"]) == (3.0, 6.0)
  kept = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(kept) == stats["records"] and all(set(r) == {"prompt", "response"} for r in kept)
  again = _run("rejection_sample", f"--init_from={weights}", f"--output={out}")
  assert again.returncode == 2 and again.stderr.startswith(f"error: --output: {out} exists")
  assert [json.loads(line) for line in out.read_text().splitlines()] == kept  # untouched


# The fast suite fine-tunes without the held-out evaluation (its generation compiles cost ~1 min
# cold; tests/test_evaluation.py covers `evaluate`); the slow variant runs it too.
@pytest.mark.parametrize("eval_problems", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_distill_fine_tunes_the_student_with_a_replayable_run_record(
  weights, tmp_path, eval_problems
):
  workdir = tmp_path / "student"
  flags = [f"--student={weights}", f"--samples={_samples(tmp_path / 's.jsonl')}"]
  flags += ["--steps=2", "--batch_size=2", "--seq_len=32", f"--eval_problems={eval_problems}"]
  proc = _run("distill", *flags, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (workdir / "flags.txt").read_text().startswith("# python -m experiments.distill ")
  assert os.path.isdir(workdir / "final") and (workdir / "metrics.jsonl").read_text()
  if eval_problems:
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert metrics["task"] == "addition" and 0.0 <= metrics["pass@1"] <= 1.0
    assert json.loads((workdir / "eval.json").read_text())["pass@1"] == metrics["pass@1"]
  else:
    assert not (workdir / "eval.json").exists()


def test_distill_bad_samples_exit_2_naming_the_line(weights, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": 3}\n')
  proc = _run("distill", f"--student={weights}", f"--samples={bad}", f"--workdir={tmp_path}/w")
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
    f"error: --samples: {bad} line 2 is not a {{prompt, response}} object"
  )
  assert not os.path.exists(tmp_path / "w")
