"""The trainer's run directory: exact replays, resume after SIGKILL, SIGTERM, bad checkpoints, NaN.

Runs go through `python -m experiments.pretrain` (the interface users have) on the tiny preset
with a small batch, so each process spends most of its time compiling.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  "--flagfile=experiments/configs/tiny_cpu.flags",
  "--num_steps=8",
  "--batch_size=4",
  "--seq_len=32",
  "--log_every=1",
  "--save_every=2",
]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _pretrain(workdir, *extra, timeout=600):
  return subprocess.run(
    [sys.executable, "-m", "experiments.pretrain", *FLAGS, f"--workdir={workdir}", *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=ENV,
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(row["step"], row["loss"]) for row in map(json.loads, f)]


def _start(workdir, *extra):
  return subprocess.Popen(
    [sys.executable, "-m", "experiments.pretrain", *FLAGS, f"--workdir={workdir}", *extra],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=ENV,
  )


def _wait_for(proc, marker, timeout=600):
  """Reads the child's output until a line contains `marker`; returns the lines read."""
  lines, deadline = [], time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if marker in line:
      return lines
    if time.time() > deadline:
      break
  raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: its workdir, for every comparison below."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  proc = _pretrain(workdir)
  assert proc.returncode == 0, proc.stderr
  return workdir


@pytest.mark.slow
def test_run_writes_the_record_and_replays_bit_identically(reference, tmp_path):
  for name in ("flags.txt", "config.json", "run_info.json", "metrics.jsonl", "checkpoints"):
    assert os.path.exists(os.path.join(reference, name)), name
  info = json.load(open(os.path.join(reference, "run_info.json")))
  assert info["backend"] == "cpu" and info["versions"]["jax"]
  want = _losses(reference)
  assert [s for s, _ in want] == list(range(8))
  again = _pretrain(str(tmp_path / "again"))
  assert again.returncode == 0, again.stderr
  assert _losses(str(tmp_path / "again")) == want  # the same flags: bit-identical
  replay = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.pretrain",
      f"--flagfile={reference}/flags.txt",
      f"--workdir={tmp_path / 'replay'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=ENV,
  )
  assert replay.returncode == 0, replay.stderr
  assert _losses(str(tmp_path / "replay")) == want  # flags.txt alone replays it


@pytest.mark.slow
def test_sigkill_then_restart_gives_the_uninterrupted_run(reference, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = _start(workdir)
  _wait_for(proc, "step     5/8 ")  # past the checkpoints of steps 2 and 4 (6 may be in flight)
  proc.kill()
  proc.wait()
  resumed = _pretrain(workdir)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout
  assert _losses(workdir) == _losses(reference)
  final_ref = _final_params(reference)
  final = _final_params(workdir)
  for key in final_ref:
    np.testing.assert_array_equal(final[key], final_ref[key])


def _final_params(workdir):
  """The saved state of the last step, read back with orbax (flattened path -> array)."""
  import orbax.checkpoint as ocp
  from flax import traverse_util

  directory = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  tree = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  leaves = traverse_util.flatten_dict({"params": tree["params"], "bias": tree["router_bias"]})
  return {"/".join(k): np.asarray(v) for k, v in leaves.items()}


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(tmp_path):
  workdir = str(tmp_path / "preempted")
  proc = _start(workdir, "--num_steps=1000", "--save_every=500")
  _wait_for(proc, "step     1/1000 ")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "SIGTERM: saved step" in out
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert steps and max(steps) < 500  # saved at the preemption, not at a scheduled step


@pytest.mark.slow
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
  import shutil

  workdir = str(tmp_path / "corrupt")
  shutil.copytree(reference, workdir)
  latest = os.path.join(workdir, "checkpoints", "8", "state")
  for root, _, files in os.walk(latest):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  resumed = _pretrain(workdir, "--num_steps=8")
  assert resumed.returncode == 0, resumed.stderr
  assert "checkpoint 8" in resumed.stdout and "unreadable" in resumed.stdout
  assert "resumed from step 6" in resumed.stdout
  assert _losses(workdir) == _losses(reference)


@pytest.mark.slow  # end to end; CI's fast suite must stay well inside its time
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  proc = _pretrain(workdir, "--learning_rate=1e30", "--save_every=1")
  assert proc.returncode == 3, proc.stdout + proc.stderr
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: step ") and ("nan" in err or "inf" in err), err
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert kept and f"({kept[-1]})" in err
  bad_step = int(err.split()[2].rstrip(":"))
  assert kept[-1] == bad_step  # the state before the bad step is the newest saved


def test_a_foreign_non_empty_workdir_is_refused_untouched(tmp_path):
  (tmp_path / "mine.txt").write_text("precious")
  proc = _pretrain(str(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: --workdir:")
  assert os.listdir(tmp_path) == ["mine.txt"]
