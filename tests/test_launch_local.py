"""launch/local.py: a 2-process job matches one process; bad input; failures and timeouts."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_FLAGS = [
  "--preset=tiny",
  "--num_steps=3",
  "--log_every=1",
  "--batch_size=8",
  "--seq_len=16",
  "--mesh=data=2,expert=4",
]
STEP = re.compile(r"^(?:\[(\d)\] )?step +(\d+)/3 +loss (\S+)")


def _run(args, timeout=600, **env):
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
  )


def _losses(stdout):
  """{process (None: unprefixed): [printed loss strings by step]}."""
  losses = {}
  for line in stdout.splitlines():
    if m := STEP.match(line):
      process = None if m[1] is None else int(m[1])
      losses.setdefault(process, []).append((int(m[2]), m[3]))
  return {p: [loss for _, loss in sorted(rows)] for p, rows in losses.items()}


@pytest.mark.slow
def test_two_processes_print_the_losses_of_one():
  # The launcher replaces the 8 devices that conftest puts in XLA_FLAGS with 4 per process.
  multi = _run(
    ["-m", "launch.local", "--job=pretrain", "--num_processes=2", "--devices_per_process=4"]
    + ["--timeout=550", "--", *PRETRAIN_FLAGS]
  )
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr
  single = _run(
    ["-m", "experiments.pretrain", *PRETRAIN_FLAGS],
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr
  assert "8 cpu device(s) in 1 process(es)" in single.stdout
  for i in (0, 1):
    assert re.search(
      rf"^\[{i}\] r1jax pretrain: .*8 cpu device\(s\) in 2 process\(es\)", multi.stdout, re.M
    ), multi.stdout[-3000:]
  expected = _losses(single.stdout)[None]
  assert len(expected) == 3
  assert _losses(multi.stdout) == {0: expected, 1: expected}, (expected, multi.stdout[-3000:])


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--job=no_such_job"], "error: --job: unknown 'no_such_job'"),
    (["--job=pretrain", "--num_processes=0"], "error: --num_processes: must be at least 1"),
    (
      ["--job=pretrain", "--devices_per_process=0"],
      "error: --devices_per_process: must be at least",
    ),
    (["--job=pretrain", "--timeout=-1"], "error: --timeout: must be positive"),
    (["--job=pretrain", "--num_processes=x"], "error: argument --num_processes: invalid int"),
    (["--num_processes=2"], "error: the following arguments are required: --job"),
    (["--job=pretrain", "--preset=tiny"], "error: unrecognized arguments: --preset=tiny"),
  ],
)
def test_bad_input_exits_2_with_one_line_and_starts_nothing(flags, message):
  proc = _run(["-m", "launch.local", *flags, "--", "--num_steps=1"], timeout=60)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
  assert proc.stdout == ""  # no process started, so no `[i] ` lines


def test_failing_job_exits_non_zero_and_names_the_process():
  proc = _run(
    ["-m", "launch.local", "--job=pretrain", "--num_processes=2", "--", "--num_steps=0"],
    timeout=120,
  )
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert re.search(r"^error: process [01] exited with code 2", proc.stderr, re.M), proc.stderr
  assert re.search(r"^\[[01]\] error: num_steps: must be positive", proc.stdout, re.M)


def _python(code):
  return [sys.executable, "-c", code]


def test_a_failure_stops_the_processes_still_running(capsys):
  start = time.monotonic()
  code = local.run_processes(
    [_python("import time; time.sleep(300)"), _python("import sys; print('bye'); sys.exit(3)")],
    [dict(os.environ)] * 2,
  )
  assert code == 3 and time.monotonic() - start < 30
  out, err = capsys.readouterr()
  assert out == "[1] bye\n"
  assert err == "error: process 1 exited with code 3; stopped the other processes\n"


def test_timeout_kills_all_processes(capsys):
  start = time.monotonic()
  code = local.run_processes(
    [_python("import time; print('up', flush=True); time.sleep(300)")] * 2,
    [dict(os.environ)] * 2,
    timeout=2,
  )
  assert code == 124 and time.monotonic() - start < 30
  out, err = capsys.readouterr()
  assert sorted(out.splitlines()) == ["[0] up", "[1] up"]
  assert err == "error: --timeout: killed all processes after 2 s\n"


def test_process_env_replaces_the_device_count_and_keeps_other_xla_flags():
  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "PATH": "/bin"}
  env = local.process_env(1, 2, 4, 1234, base)
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
  assert env["R1JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["R1JAX_NUM_PROCESSES"], env["R1JAX_PROCESS_ID"]) == ("2", "1")


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(tmp_path):
  """2 processes train 2 steps and save (each process's data rows merged into the checkpoint);
  1 process resumes to step 4: the losses equal a 1-process run of 4 steps."""
  flags = ["--preset=tiny", "--batch_size=8", "--seq_len=16", "--log_every=1", "--save_every=2"]
  flags += ["--mesh=data=2,expert=4", "--lr_schedule=constant", "--warmup_steps=0"]
  eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  split = str(tmp_path / "split")
  multi = _run(
    ["-m", "launch.local", "--job=pretrain", "--num_processes=2", "--devices_per_process=4"]
    + ["--timeout=550", "--", *flags, "--num_steps=2", f"--workdir={split}"]
  )
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr
  resumed = _run(
    ["-m", "experiments.pretrain", *flags, "--num_steps=4", f"--workdir={split}"], **eight
  )
  assert resumed.returncode == 0 and "resumed from step 2" in resumed.stdout, resumed.stderr
  whole = str(tmp_path / "whole")
  single = _run(
    ["-m", "experiments.pretrain", *flags, "--num_steps=4", f"--workdir={whole}"], **eight
  )
  assert single.returncode == 0, single.stderr

  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [(row["step"], row["loss"]) for row in map(json.loads, f)]

  assert [s for s, _ in losses(whole)] == [0, 1, 2, 3]
  assert [s for s, _ in losses(split)] == [0, 1, 2, 3]
  # Same batches in the same order; gloo's cross-process sums may round differently.
  assert [v for _, v in losses(split)] == pytest.approx([v for _, v in losses(whole)], rel=1e-5)
