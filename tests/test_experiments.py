"""Entry points: a short run through the same library call the experiment makes; bad flags."""

import os
import subprocess
import sys

import pytest

from r1jax import ModelConfig
from r1jax.train.loop import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pretrain_library_call_lowers_the_loss():
  cfg = ModelConfig.from_preset("tiny")
  lines = []
  history = train(
    cfg, TrainConfig(num_steps=40, batch_size=8, seq_len=32, log_every=10), lines.append
  )
  assert [row["step"] for row in history] == [0, 10, 20, 30, 39]
  assert history[-1]["lm_loss"] < 0.7 * history[0]["lm_loss"]
  assert lines[0].startswith("step     0/40  loss")


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--preset=v4", "error: preset: unknown preset 'v4'"),
    ("--num_steps=x", "error: flag --num_steps=x"),
    ("--num_steps=0", "error: num_steps: must be positive"),
    ("--seq_len=4096", "error: seq_len: 4096 exceeds max_position_embeddings=512"),
    ("--moe_impl=cuda", "error: moe_impl: 'cuda'"),
    ("--no_such_flag=1", "error: Unknown command line flag 'no_such_flag'"),
    ("--init_from=/nonexistent", "error: init_from: /nonexistent: not an r1jax weights directory"),
    # tests/conftest.py gives this process, and so the child, 8 simulated CPU devices
    ("--mesh=data=16", "error: --mesh: data=16,fsdp=1,expert=1,tensor=1 needs 16 devices but 8"),
    ("--mesh=pipe=2", "error: --mesh: 'pipe=2' is not AXIS=SIZE"),
    ("--mesh=expert=3", "error: --mesh: expert=3 does not divide n_routed_experts=8"),
    ("--rules=tp", "error: --rules: unknown 'tp'"),
  ],
)
def test_pretrain_bad_flags_exit_2_with_one_line(flag, message):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.pretrain", flag],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
  assert "step" not in proc.stdout  # stopped before any training


def test_readme_test_command_is_what_ci_runs():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = f.read()
  test_line = next(
    line for line in readme.splitlines() if "pytest" in line and "pip install" in line
  )
  runner = test_line.split("&& ")[-1].replace(".venv/bin/python", "").strip()
  assert runner in ci, (runner, ci)
  assert ".venv/bin/pip install -e '.[test,hf]'" in test_line
