"""experiments.r1_pipeline: its pinned flags, its refusals and its table (the run itself: slow)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from r1jax.train import stages as r1_pipeline  # the pipeline's stages, metrics and table
from tests.cli import ROOT, run_module


def test_bad_flags_exit_2_with_one_line_before_anything_is_written(tmp_path):
  workdir = tmp_path / "run"
  proc = run_module(
    "experiments.r1_pipeline",
    f"--workdir={workdir}",
    "--student_overrides=first_k_dense_replace=1",
  )
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--student_overrides" in lines[0] and "dense" in lines[0]
  assert not workdir.exists()


def test_the_table_has_every_stage_and_metric():
  results = {s: {m: 0.5 for m in r1_pipeline.EVAL_METRICS} for s in r1_pipeline.STAGES}
  results["rejection_sampling"] = {"records": 17, "seconds": 3.0}
  del results["student_base"]["pass@1"]
  text = r1_pipeline.table(results)
  lines = text.splitlines()
  assert len(lines) == 2 + len(r1_pipeline.STAGES)
  assert all(m in lines[0] for m in r1_pipeline.EVAL_METRICS)
  assert "kept 17" in text
  student_base = next(line for line in lines if line.startswith("student_base"))
  assert str(math.nan) in student_base


_MINI = (
  "--pretrain_steps=4",
  "--student_pretrain_steps=4",
  "--sft_steps=2",
  "--r1_zero_iterations=2",
  "--reasoning_iterations=2",
  "--prompts_per_iteration=2",
  "--group_size=2",
  "--max_new_tokens=16",
  "--rejection_problems=4",
  "--rejection_samples=2",
  "--eval_problems=4",
  "--eval_samples=2",
  "--corpus_size=2000",
  "--cold_start_examples=16",
  "--batch_size=8",
  "--seq_len=64",
)


@pytest.mark.slow
def test_a_killed_pipeline_resumes_from_the_last_finished_stage(tmp_path):
  """Every stage of a miniature run (a few steps each), killed during cold_start_sft and rerun:
  the finished stages are skipped, the rest run, and the results name every stage."""
  workdir = tmp_path / "run"
  args = [sys.executable, "-m", "experiments.r1_pipeline", f"--workdir={workdir}", *_MINI]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen(
    args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  marker = workdir / "cold_start_sft" / "flags.txt"
  deadline = time.time() + 600
  while not marker.exists() and child.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert marker.exists(), child.stderr.read().decode()[-2000:] if child.poll() is not None else ""
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not (workdir / "cold_start_sft" / "stage.json").exists()
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "== base: finished earlier" in proc.stdout
  assert "== r1_zero: finished earlier" in proc.stdout
  assert "== cold_start_sft\n" in proc.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == set(r1_pipeline.STAGES)
  for stage in ("base", "r1_zero", "cold_start_sft", "reasoning_grpo", "student_base"):
    assert {"pass@1", "pass@k", "greedy_acc", "think_rate", "mean_length"} <= set(results[stage])
    for name in ("flags.txt", "config.json", "run_info.json", "metrics.jsonl", "final"):
      assert (workdir / stage / name).exists(), (stage, name)
  assert (workdir / "plots" / "rl_curves.png").stat().st_size > 0
  assert r1_pipeline.table(results).splitlines()[0] in proc.stdout
