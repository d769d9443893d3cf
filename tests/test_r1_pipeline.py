"""experiments.r1_pipeline: its pinned flags, its refusals and its table (the run itself: slow)."""

import json
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
  assert student_base.split()[1:3] == ["-", "0.500"]  # the missing pass@1, then pass@k


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


def _processes_with(*parts: str) -> list[int]:
  """Pids whose command line holds every part (Linux /proc)."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    except OSError:
      continue
    if all(part in cmdline for part in parts):
      found.append(int(pid))
  return found


@pytest.mark.slow
def test_a_killed_pipeline_resumes_from_the_last_finished_stage(tmp_path):
  """Every stage of a miniature run (a few steps each), killed once the cold-start chain has
  started beside R1-Zero, and rerun: the finished stages are skipped, the rest run (the chain
  in the second process again), and the results name every stage."""
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
  beside = _processes_with(str(workdir), "--only_stages=")
  deadline = time.time() + 10  # the second process notices its parent is gone within 1 s
  while beside and time.time() < deadline:
    time.sleep(0.2)
    beside = _processes_with(str(workdir), "--only_stages=")
  assert not beside, "the second process outlived the killed pipeline"
  finished = {s for s in r1_pipeline.STAGES if (workdir / s / "stage.json").exists()}
  assert "base" in finished and "cold_start_sft" not in finished, finished
  proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in finished:
    assert f"== {stage}: finished earlier, skipped" in proc.stdout, stage
  if "r1_zero" not in finished:  # it was running in the killed process: it runs again
    assert "== r1_zero\n" in proc.stdout
  assert "== cold_start_sft (in the second process)" in proc.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == set(r1_pipeline.STAGES)
  for stage in ("base", "r1_zero", "cold_start_sft", "reasoning_grpo", "student_base"):
    assert {"pass@1", "pass@k", "greedy_acc", "think_rate", "mean_length"} <= set(results[stage])
    for name in ("flags.txt", "config.json", "run_info.json", "metrics.jsonl", "final"):
      assert (workdir / stage / name).exists(), (stage, name)
  assert "--only_stages" not in (workdir / "cold_start_sft" / "flags.txt").read_text()
  assert (workdir / "plots" / "rl_curves.png").stat().st_size > 0
  assert r1_pipeline.table(results).splitlines()[0] in proc.stdout


def _fake_run(directory, seed, base, zero, student, distilled, wall):
  results = {stage: {m: 0.5 for m in r1_pipeline.EVAL_METRICS} for stage in r1_pipeline.STAGES}
  results["base"].update({"pass@1": base, "think_rate": 0.4, "mean_length": 23.0})
  results["r1_zero"].update({"pass@1": zero, "think_rate": 1.0, "mean_length": 41.5})
  results["student_base"]["pass@1"] = student
  results["student_distilled"]["pass@1"] = distilled
  os.makedirs(directory / f"seed_{seed}")
  (directory / f"seed_{seed}" / "results.json").write_text(json.dumps(results))
  (directory / f"seed_{seed}" / "wall_time.json").write_text(json.dumps({"wall_seconds": wall}))


def test_the_seed_report_compares_base_and_r1_zero_on_every_seed(tmp_path):
  _fake_run(tmp_path, 0, 0.40, 0.80, 0.45, 0.95, 700.0)
  _fake_run(tmp_path, 1, 0.30, 0.50, 0.40, 0.30, 710.0)  # +20 points; distillation lost
  proc = run_module("experiments.r1_seeds", f"--workdir={tmp_path}", "--seeds=0,1", "--report_only")
  assert proc.returncode == 0, proc.stderr
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| seed | base pass@1 | R1-Zero pass@1 | gain (points) |")
  assert rows[1].startswith("| 0 | 0.400 | 0.800 | +40.0 | 0.40 -> 1.00 | 23.0 -> 41.5 |")
  assert rows[2].startswith("| 1 | 0.300 | 0.500 | +20.0 |") and rows[2].endswith("| 710 |")
  assert "R1-Zero gain >= 25 points on every seed: no" in proc.stdout
  assert "distilled student beats the directly trained one on every seed: no" in proc.stdout
  assert (tmp_path / "seeds.md").read_text() in proc.stdout
  assert json.loads((tmp_path / "seeds.json").read_text())[0]["gain (points)"] == pytest.approx(40)
