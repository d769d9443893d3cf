"""Entry points: a short run through the same library call the experiment makes; bad flags."""

import json
import os

import pytest

from r1jax import ModelConfig
from r1jax.train.loop import TrainConfig, train
from tests.cli import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # end to end; CI's fast suite must stay well inside its time
def test_pretrain_library_call_lowers_the_loss():
  cfg = ModelConfig.from_preset("tiny")
  lines = []
  history = train(
    cfg, TrainConfig(num_steps=40, batch_size=8, seq_len=32, log_every=10), lines.append
  )
  assert [row["step"] for row in history] == [0, 10, 20, 30, 39]
  assert history[-1]["lm_loss"] < 0.7 * history[0]["lm_loss"]
  assert lines[0].startswith("step     0/40  loss")


BAD_FLAGS = [
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
  ("--data_source=text", "error: data_files: source 'text' needs at least one file"),
  ("--data_source=text --data_files=/nope.txt", "error: --data_files: no such file '/nope.txt'"),
  # README.md has bytes >= 100: a 100-id model rejects them, naming the file
  (
    "--data_source=text --data_files=README.md --model_overrides=vocab_size=100",
    "error: --tokenizer: 'README.md' encodes to token id",
  ),
  ("--lr_schedule=linear", "error: flag --lr_schedule=linear: value should be one of"),
  ("--model_overrides=layers=2", "error: --model_overrides: 'layers=2' is not FIELD=VALUE"),
  ("--model_overrides=num_hidden_layers=x", "error: --model_overrides: num_hidden_layers='x'"),
  ("--remat=some", "error: remat: 'some'"),
  ("--batch_size=6 --mesh=data=4,expert=2", "error: --batch_size: 6 does not split over"),
  ("--attention_windows=0,8", "error: attention_windows: has 2 entries for num_hidden_layers=3"),
  ("--attention_windows=0,x,0", "error: --attention_windows: '0,x,0' is not a list of integers"),
  (
    "--merge_ratio=0.25 --merge_layer=2 --inflate_layer=1",
    "error: merge_layer: merge_layer=2 and inflate_layer=1 need",
  ),
]


@pytest.fixture(scope="module")
def bad_flag_results():
  """Every BAD_FLAGS set through experiments.pretrain's parser and main, in one child process
  (tests/flag_cases.py), keyed by the flag string."""
  cases = [flag.split() for flag, _ in BAD_FLAGS]
  proc = run_module("tests.flag_cases", json.dumps(cases), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  return {" ".join(r["args"]): r for r in results}


@pytest.mark.parametrize("flag, message", BAD_FLAGS)
def test_pretrain_bad_flags_exit_2_with_one_line(bad_flag_results, flag, message):
  result = bad_flag_results[flag]
  assert result["code"] == 2, result
  lines = result["stderr"].strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), result["stderr"]
  assert "step" not in result["stdout"]  # stopped before any training


def test_a_bad_flag_exits_2_from_the_command_line_too():
  """The same path as a real invocation, once (the cases above run in one process)."""
  proc = run_module("experiments.pretrain", "--mesh=expert=3")
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
    "error: --mesh: expert=3 does not divide n_routed_experts=8 (of a MoE layer); choose a divisor"
  ) or proc.stderr.startswith("error: --mesh: expert=3 does not divide"), proc.stderr


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


def test_bad_flags_leave_an_existing_run_untouched(tmp_path):
  """A run's workdir, then a rerun with a missing data file: exit 2, nothing rewritten."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "flags.txt").write_text("--preset=tiny\n")
  (workdir / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
  before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.iterdir()}
  proc = run_module(
    "experiments.pretrain",
    f"--workdir={workdir}",
    "--data_source=jsonl",
    "--data_files=/nope.jsonl",
  )
  assert proc.returncode == 2 and proc.stderr.startswith("error: --data_files: no such file")
  assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in workdir.iterdir()} == before


def test_sft_refuses_a_plain_text_source():
  proc = run_module("experiments.sft", "--data_source=text", "--data_files=README.md")
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: --data_source: sft trains on prompt/response pairs")


def test_resuming_with_a_different_model_is_refused_untouched(tmp_path):
  """config.json of a tiny run, then --preset=small in the same workdir: exit 2, files as they
  were (a checkpoint that cannot restore must never be set aside as unreadable)."""
  import dataclasses

  from r1jax.data.pipeline import DataConfig

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "flags.txt").write_text("--preset=tiny\n")
  stored = {
    "model": dataclasses.asdict(ModelConfig.from_preset("tiny")),
    "train": dataclasses.asdict(TrainConfig()),
    "data": json.loads(json.dumps(dataclasses.asdict(DataConfig()))),
  }
  (workdir / "config.json").write_text(json.dumps(stored))
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  proc = run_module("experiments.pretrain", f"--workdir={workdir}", "--preset=small")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f"error: --workdir: {workdir} holds a run made with vocab_size=256")
  assert "(now 8192)" in proc.stderr and f"--flagfile={workdir}/flags.txt" in proc.stderr
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
