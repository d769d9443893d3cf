"""experiments.grpo end to end for 2 iterations on a tiny model, and its refusals."""

import json
import os

import jax
import jax.numpy as jnp
import pytest
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.checkpoint import load_weights, save_weights
from r1jax.model import Transformer
from tests.cli import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  return run_module("experiments.grpo", *flags, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  return save_weights(str(tmp_path_factory.mktemp("w") / "base"), cfg, variables)


def test_two_iterations_write_metrics_and_final_weights(weights, tmp_path):
  workdir = tmp_path / "run"
  proc = _run(
    f"--init_from={weights}",
    f"--workdir={workdir}",
    "--iterations=2",
    "--prompts_per_iteration=2",
    "--group_size=2",
    "--max_new_tokens=4",
    "--log_every=1",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["iteration"] for r in rows] == [0, 1]
  assert {"reward/accuracy", "reward/format_think", "zero_std_groups", "kl"} <= set(rows[0])
  assert (workdir / "flags.txt").read_text().count("--group_size=2") == 1
  cfg, trained = load_weights(str(workdir / "final"))
  assert cfg.num_nextn_predict_layers == 0 and "params" in trained


@pytest.mark.slow  # a child process each; the library's own checks are tested in the fast suite
@pytest.mark.parametrize(
  "flag, message",
  [
    ("--rewards=bogus:1", "error: --rewards: 'bogus:1' is not NAME:WEIGHT"),
    ("--loss_aggregation=mean", "error: loss_aggregation: unknown 'mean'"),
    ("--temperature=0", "error: temperature: GRPO samples"),
  ],
)
def test_bad_flags_exit_2(weights, tmp_path, flag, message):
  proc = _run(f"--init_from={weights}", f"--workdir={tmp_path / 'run'}", flag)
  assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a child process
def test_a_task_file_with_a_bad_line_exits_2_naming_it_before_anything_is_written(
  weights, tmp_path
):
  problems = tmp_path / "problems.jsonl"
  problems.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2=", "answer": }\n')
  proc = _run(f"--init_from={weights}", f"--workdir={tmp_path / 'run'}", f"--task_file={problems}")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"error: --task_file: task file {problems}: 1 malformed line(s)")
  assert "line 2: not JSON" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a child process that compiles
def test_grpo_trains_on_a_task_file(weights, tmp_path):
  problems = tmp_path / "problems.jsonl"
  problems.write_text(
    "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(20))
  )
  proc = _run(
    f"--init_from={weights}",
    f"--workdir={tmp_path / 'run'}",
    f"--task_file={problems}",
    "--iterations=1",
    "--prompts_per_iteration=2",
    "--group_size=2",
    "--max_new_tokens=4",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "run" / "config.json"))["task"] == str(problems)
  assert (tmp_path / "run" / "final").is_dir()
