r"""Reruns a finished run from its flags.txt into a new directory and says whether it matched.

  python -m experiments.replay RUN_DIR NEW_DIR [-- FLAGS]

RUN_DIR's flags.txt names the experiment that wrote it on its first line (`# python -m
experiments.<job> ...`). This runs `python -m experiments.<job> --flagfile=RUN_DIR/flags.txt
--workdir=NEW_DIR [FLAGS]` (its output streams through), then compares the two directories:
every logged step of metrics.jsonl (loss and the other deterministic values, not timings), and
results.json where the run has one (the R1 pipeline's stage table). Prints one line, "identical"
or the first difference, with the run_info.json fields that differ (git revision, versions,
backend, devices), which are the usual reason. Exit 0 identical, 1 different, 2 bad input (NEW_DIR
must be new or empty: nothing already written is touched).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence

from experiments.flag_errors import exit_on_bad_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Logged values that measure the machine, not the computation.
TIMING_KEYS = {"tokens_per_s", "mfu", "step_time_s", "seconds", "elapsed_s", "eta_s", "wall_s"}


def job_of(flags_file: str) -> str:
  """The experiment named on a flags.txt's first line; exits 2 when there is none."""
  with open(flags_file) as f:
    first = f.readline()
  m = re.match(r"#\s*python\S*\s+-m\s+experiments\.([\w.]+)", first)
  if not m:
    exit_on_bad_input(
      f"{flags_file}: the first line does not name the experiment "
      f"(`# python -m experiments.<job> ...`); run it by hand with --flagfile"
    )
  return m[1]


def _rows(path: str) -> dict[int, dict]:
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          rows[int(row["step"])] = row
  return rows


def _is_timing(key: str) -> bool:
  return key in TIMING_KEYS or key.endswith("_per_s") or key.endswith("_seconds")


def compare_metrics(before: str, after: str) -> tuple[int, str | None]:
  """(steps compared, the first difference or None) between two metrics.jsonl files."""
  a, b = _rows(before), _rows(after)
  steps = sorted(set(a) & set(b))
  if a and not steps:
    return 0, f"no logged step in common ({len(a)} before, {len(b)} now)"
  for step in steps:
    for key in sorted(set(a[step]) | set(b[step])):
      if _is_timing(key):
        continue
      if a[step].get(key) != b[step].get(key):
        return len(
          steps
        ), f"step {step}: {key} {a[step].get(key)!r} before, {b[step].get(key)!r} now"
  if len(steps) < len(a):
    return len(steps), f"only {len(steps)} of the {len(a)} logged steps were replayed"
  return len(steps), None


def compare_results(before: str, after: str) -> str | None:
  """The first differing {stage: {metric}} value of two results.json files, or None."""
  with open(before) as f:
    a = json.load(f)
  if not os.path.exists(after):
    return "the replay wrote no results.json"
  with open(after) as f:
    b = json.load(f)
  for stage in a:
    for metric, value in a[stage].items():
      if _is_timing(metric):
        continue
      now = b.get(stage, {}).get(metric)
      if now != value:
        return f"{stage}: {metric} {value!r} before, {now!r} now"
  return None


def run_info_changes(before: str, after: str) -> list[str]:
  """'field: before -> now' for the run_info.json fields that differ."""
  if not (os.path.exists(before) and os.path.exists(after)):
    return []
  with open(before) as f:
    a = json.load(f)
  with open(after) as f:
    b = json.load(f)
  flat = lambda d: {
    f"{k}.{kk}" if isinstance(v, dict) else k: vv
    for k, v in d.items()
    for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])
  }
  a, b = flat(a), flat(b)
  return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  if len(argv[:split]) != 2 or any(a.startswith("-") for a in argv[:split]):
    exit_on_bad_input("usage: python -m experiments.replay RUN_DIR NEW_DIR [-- FLAGS]")
  run_dir, new_dir = argv[:2]
  flags_file = os.path.join(run_dir, "flags.txt")
  if not os.path.isfile(flags_file):
    exit_on_bad_input(f"RUN_DIR: {flags_file} does not exist; give a run's directory")
  if os.path.abspath(run_dir) == os.path.abspath(new_dir):
    exit_on_bad_input("NEW_DIR: must differ from RUN_DIR (the replay writes a run of its own)")
  if os.path.exists(new_dir) and (not os.path.isdir(new_dir) or os.listdir(new_dir)):
    exit_on_bad_input(f"NEW_DIR: {new_dir} exists and is not empty; give a new directory")
  job = job_of(flags_file)
  command = [sys.executable, "-m", f"experiments.{job}", f"--flagfile={flags_file}"]
  command += [f"--workdir={new_dir}", *argv[split + 1 :]]
  print(f"replay: {' '.join(command[1:])}", flush=True)
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }
  code = subprocess.run(command, env=env, check=False).returncode
  if code:
    print(f"replay: the run exited with code {code}; nothing compared", file=sys.stderr)
    return code
  differences = []
  steps, metrics = compare_metrics(
    os.path.join(run_dir, "metrics.jsonl"), os.path.join(new_dir, "metrics.jsonl")
  )
  if metrics:
    differences.append(f"metrics.jsonl, {metrics}")
  if os.path.exists(os.path.join(run_dir, "results.json")):
    results = compare_results(
      os.path.join(run_dir, "results.json"), os.path.join(new_dir, "results.json")
    )
    if results:
      differences.append(f"results.json, {results}")
  what = [f"{steps} logged steps"] if steps else []
  what += ["the results table"] if os.path.exists(os.path.join(run_dir, "results.json")) else []
  if not what:
    print("replay: the run logged nothing to compare", file=sys.stderr)
    return 1
  if not differences:
    print(f"replay: identical ({' and '.join(what)} of {run_dir}, bit for bit)")
    return 0
  changes = run_info_changes(
    os.path.join(run_dir, "run_info.json"), os.path.join(new_dir, "run_info.json")
  )
  print(f"replay: DIFFERENT, {differences[0]}")
  if changes:
    print(f"replay: the runs differ in run_info.json: {'; '.join(changes[:6])}")
  return 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
