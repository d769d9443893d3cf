r"""The R1 pipeline over several seeds, and the comparison the README's table shows.

  python -m experiments.r1_seeds --seeds=0,1,2 --workdir=/tmp/r1_seeds

Runs `experiments.r1_pipeline --seed=N --workdir=WORKDIR/seed_N` for each seed in turn (with
the pinned flags of experiments/configs/r1_pipeline_cpu.flags, plus any --pipeline_flag), each
resuming where an earlier attempt stopped, then prints one row per seed from the runs'
results.json: held-out pass@1 of the base model and after R1-Zero GRPO and the gain in points,
the <think> rate and mean reply length before and after, and pass@1 of the dense student
pretrained directly against the one distilled from the teacher's samples. `--report_only`
prints the table from finished runs without running anything. The table goes to
WORKDIR/seeds.md, the numbers to WORKDIR/seeds.json. The held-out problems are the same for
every seed and stage (the pipeline's --eval_seed); the seed changes the weights, the corpus, the
RL sampling and the problems trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Pipeline seeds.")
flags.DEFINE_string("workdir", "/tmp/r1jax_r1_seeds", "One subdirectory per seed: seed_N.")
flags.DEFINE_multi_string(
  "pipeline_flag",
  [],
  "A flag passed on to every pipeline run, e.g. --pipeline_flag=--tokenizer=task.",
)
flags.DEFINE_bool("report_only", False, "Only print the table from the finished runs.")
flags.DEFINE_float("min_gain", 0.25, "The R1-Zero pass@1 gain every seed should reach.")

COLUMNS = (
  ("seed", "{}"),
  ("base pass@1", "{:.3f}"),
  ("R1-Zero pass@1", "{:.3f}"),
  ("gain (points)", "{:+.1f}"),
  ("think rate", "{}"),
  ("length (tokens)", "{}"),
  ("base think_acc", "{:.3f}"),
  ("student base", "{:.3f}"),
  ("student distilled", "{:.3f}"),
  ("wall (s)", "{:.0f}"),  # the pipeline's last invocation (a resumed one is shorter)
)


def seed_row(seed: int, results: dict) -> dict:
  base, zero = results["base"], results["r1_zero"]
  return {
    "seed": seed,
    "base pass@1": base["pass@1"],
    "R1-Zero pass@1": zero["pass@1"],
    "gain (points)": 100 * (zero["pass@1"] - base["pass@1"]),
    "think rate": f"{base['think_rate']:.2f} -> {zero['think_rate']:.2f}",
    "length (tokens)": f"{base['mean_length']:.1f} -> {zero['mean_length']:.1f}",
    "base think_acc": base["think_acc"],
    "student base": results["student_base"]["pass@1"],
    "student distilled": results["student_distilled"].get("pass@1", float("nan")),
    "wall (s)": results.get("wall_seconds", float("nan")),
  }


def markdown(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |"]
  lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
  for row in rows:
    lines.append("| " + " | ".join(fmt.format(row[name]) for name, fmt in COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def run_seed(seed: int, workdir: str) -> int:
  command = [
    sys.executable,
    "-m",
    "experiments.r1_pipeline",
    f"--seed={seed}",
    f"--workdir={workdir}",
    *FLAGS.pipeline_flag,
  ]
  print(f"== seed {seed}: {' '.join(command[1:])}", flush=True)
  return subprocess.call(command)


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    exit_on_bad_input(f"--seeds: {','.join(FLAGS.seeds)} is not a list of integers")
  rows = []
  for seed in seeds:
    workdir = os.path.join(FLAGS.workdir, f"seed_{seed}")
    path = os.path.join(workdir, "results.json")
    if not FLAGS.report_only:
      code = run_seed(seed, workdir)
      if code != 0:
        print(f"error: the seed-{seed} pipeline exited with code {code}", file=sys.stderr)
        sys.exit(1)
    if not os.path.isfile(path):
      print(f"seed {seed}: no results in {path}", file=sys.stderr)
      continue
    with open(path) as f:
      results = json.load(f)
    wall = os.path.join(workdir, "wall_time.json")
    if os.path.isfile(wall):
      with open(wall) as f:
        results["wall_seconds"] = json.load(f)["wall_seconds"]
    rows.append(seed_row(seed, results))
  if not rows:
    sys.exit(1)
  text = markdown(rows)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "seeds.md"), "w") as f:
    f.write(text)
  with open(os.path.join(FLAGS.workdir, "seeds.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print(text)
  held = all(r["gain (points)"] >= 100 * FLAGS.min_gain for r in rows)
  distilled = all(r["student distilled"] > r["student base"] for r in rows)
  print(
    f"R1-Zero gain >= {100 * FLAGS.min_gain:.0f} points on every seed: {'yes' if held else 'no'}"
  )
  print(
    f"distilled student beats the directly trained one on every seed: {'yes' if distilled else 'no'}"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
