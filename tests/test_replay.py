"""experiments/replay.py: rerun from flags.txt, compare bit for bit, refuse to overwrite."""

import json
import os

import pytest

from experiments import replay
from tests.cli import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(directory, rows, header="# python -m experiments.pretrain --flagfile=<this file>"):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "flags.txt"), "w") as f:
    f.write(f"{header}\n--preset=tiny\n")
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return str(directory)


def _rows(losses, tokens_per_s=100.0):
  return [{"step": i, "loss": x, "tokens_per_s": tokens_per_s + i} for i, x in enumerate(losses)]


def test_metrics_compare_every_value_but_timings(tmp_path):
  a = _write_run(tmp_path / "a", _rows([7.25, 6.5, 6.0]))
  same = _write_run(tmp_path / "b", _rows([7.25, 6.5, 6.0], tokens_per_s=3.0))  # timing differs
  assert replay.compare_metrics(f"{a}/metrics.jsonl", f"{same}/metrics.jsonl") == (3, None)
  off = _write_run(tmp_path / "c", _rows([7.25, 6.5, 6.000000001]))
  assert replay.compare_metrics(f"{a}/metrics.jsonl", f"{off}/metrics.jsonl") == (
    3,
    "step 2: loss 6.0 before, 6.000000001 now",
  )
  short = _write_run(tmp_path / "d", _rows([7.25]))
  assert replay.compare_metrics(f"{a}/metrics.jsonl", f"{short}/metrics.jsonl") == (
    1,
    "only 1 of the 3 logged steps were replayed",
  )


def test_results_tables_compare_stage_by_stage(tmp_path):
  before, after = tmp_path / "a.json", tmp_path / "b.json"
  before.write_text(json.dumps({"base": {"pass@1": 0.4, "wall_s": 9}, "r1_zero": {"pass@1": 0.8}}))
  after.write_text(json.dumps({"base": {"pass@1": 0.4, "wall_s": 7}, "r1_zero": {"pass@1": 0.8}}))
  assert replay.compare_results(str(before), str(after)) is None
  after.write_text(json.dumps({"base": {"pass@1": 0.4}, "r1_zero": {"pass@1": 0.75}}))
  assert replay.compare_results(str(before), str(after)) == "r1_zero: pass@1 0.8 before, 0.75 now"


def _replay(*args):
  return run_module("experiments.replay", *args, timeout=600)


def test_bad_input_exits_2_with_one_line_and_touches_nothing(tmp_path):
  run = _write_run(tmp_path / "run", _rows([1.0]))
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("trained")
  anonymous = _write_run(tmp_path / "anon", _rows([1.0]), header="--seed=0")
  cases = [
    ((run, str(full)), f"error: NEW_DIR: {full} exists and is not empty"),
    ((str(tmp_path / "none"), str(tmp_path / "n")), "error: RUN_DIR: "),
    ((run, run), "error: NEW_DIR: must differ from RUN_DIR"),
    ((run,), "error: usage: python -m experiments.replay RUN_DIR NEW_DIR"),
    ((anonymous, str(tmp_path / "n2")), f"error: {anonymous}/flags.txt: the first line"),
  ]
  for args, message in cases:
    proc = _replay(*args)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), (args, proc.stderr)
  assert (full / "keep.txt").read_text() == "trained" and os.listdir(full) == ["keep.txt"]


@pytest.mark.slow
def test_a_pretrain_run_replays_bit_for_bit_and_a_changed_seed_is_reported(tmp_path):
  flags = ["--flagfile=experiments/configs/tiny_cpu.flags", "--num_steps=4", "--log_every=1"]
  first = run_module("experiments.pretrain", *flags, f"--workdir={tmp_path}/run", timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  same = _replay(f"{tmp_path}/run", f"{tmp_path}/again")
  assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
  assert f"replay: identical (4 logged steps of {tmp_path}/run, bit for bit)" in same.stdout
  other = _replay(f"{tmp_path}/run", f"{tmp_path}/seed1", "--", "--seed=1")
  assert other.returncode == 1, other.stdout[-2000:]
  assert "replay: DIFFERENT, metrics.jsonl, step 0: " in other.stdout
