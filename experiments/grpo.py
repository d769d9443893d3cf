r"""GRPO on a synthetic task from a pretrained model (R1-Zero style by default).

  python -m experiments.grpo --init_from=/tmp/base_run --task=addition --rewards=r1_zero \
      --iterations=100 --prompts_per_iteration=16 --group_size=8 --workdir=/tmp/r1_zero

`--init_from` is a weights directory or a pretraining run's workdir. The workdir gets flags.txt,
config.json, metrics.jsonl (one row per iteration: rewards per function, zero-std group fraction,
think rate, lengths, loss, KL, clip fraction, grad norm) and `final/` (the trained weights, a
weights directory `--init_from` and `experiments.evaluate` read). Reward presets: `r1_zero`
(accuracy + format with <think>, equal weights), `reasoning` (accuracy + language consistency),
or NAME:WEIGHT,... over r1jax.train.rewards.REWARD_FUNCTIONS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from experiments.flagfile import replayable_flags
from r1jax import host_memory
from r1jax.checkpoint import load_weights, read_config, save_weights
from r1jax.data.task_file import TaskFileError, load_task_file
from r1jax.data.tasks import TASKS
from r1jax.data.tokenizer import load_tokenizer
from r1jax.train import grpo
from r1jax.train.rewards import REWARD_FUNCTIONS, RewardError, RewardSet
from r1jax.train.rl import RLConfig, train_grpo

PRESETS = {
  "r1_zero": {"accuracy": 1.0, "format_think": 1.0},
  "reasoning": {"accuracy": 1.0, "language": 1.0},
}
FLAGS = flags.FLAGS
flags.DEFINE_string("init_from", None, "Weights directory or pretraining run workdir.")
flags.DEFINE_string("workdir", None, "Run directory (must be new or empty).")
flags.DEFINE_enum("task", "addition", sorted(TASKS), "Synthetic task.")
flags.DEFINE_string(
  "task_file",
  None,
  "JSONL of your own problems ({prompt, answer[, reasoning, split]} per line; "
  "r1jax.data.task_file); replaces --task.",
)
flags.DEFINE_string("tokenizer", "bytes", "bytes | task | a tokenizer.json: the model's.")
flags.DEFINE_string("rewards", "r1_zero", "r1_zero | reasoning | NAME:WEIGHT,...")
for field in dataclasses.fields(RLConfig):
  kind = {int: flags.DEFINE_integer, float: flags.DEFINE_float}[type(field.default)]
  kind(field.name, field.default, f"RLConfig.{field.name}.")
for field in dataclasses.fields(grpo.GRPOConfig):
  kind = {
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    str: flags.DEFINE_string,
  }[type(field.default)]
  kind(field.name, field.default, f"GRPOConfig.{field.name}.")


def reward_set(spec: str) -> RewardSet:
  if spec in PRESETS:
    return RewardSet(PRESETS[spec])
  weights = {}
  for item in spec.split(","):
    name, sep, weight = item.partition(":")
    try:
      weights[name] = float(weight)
    except ValueError:
      sep = ""
    if not sep or name not in REWARD_FUNCTIONS:
      raise ValueError(
        f"--rewards: {item!r} is not NAME:WEIGHT with NAME in {sorted(REWARD_FUNCTIONS)} "
        f"(or use a preset: {sorted(PRESETS)})"
      )
  return RewardSet(weights)


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  host_memory.retain_freed_memory_on_cpu()  # before XLA's threads start
  try:
    if not FLAGS.init_from:
      raise ValueError("--init_from: GRPO starts from a pretrained model; name its weights or run")
    try:
      model_cfg = read_config(FLAGS.init_from)
    except ValueError as err:
      raise ValueError(f"--init_from: {err}") from None
    if not FLAGS.workdir:
      raise ValueError("--workdir: name a new directory for the run")
    if os.path.isdir(FLAGS.workdir) and os.listdir(FLAGS.workdir):
      raise ValueError(f"--workdir: {FLAGS.workdir} is not empty; GRPO runs start in a new one")
    rewards = reward_set(FLAGS.rewards)
    rl_cfg = RLConfig(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(RLConfig)})
    try:
      tokenizer = load_tokenizer(FLAGS.tokenizer)
    except (ValueError, OSError) as err:
      raise ValueError(f"--{err}") from None
    task = TASKS[FLAGS.task]
    if FLAGS.task_file:
      try:
        task = load_task_file(FLAGS.task_file)
        task.check_prompts(tokenizer.encode, rl_cfg.max_prompt_len)
      except TaskFileError as err:
        raise ValueError(f"--task_file: {err}") from None
    grpo_cfg = grpo.GRPOConfig(
      **{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(grpo.GRPOConfig)}
    )
  except ValueError as err:
    exit_on_bad_input(str(err))
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "flags.txt"), "w") as f:
    f.write(
      replayable_flags(header="python -m experiments.grpo --flagfile=<this file> --workdir=NEW")
    )
  with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
    json.dump(
      {
        "model": dataclasses.asdict(model_cfg),
        "rl": dataclasses.asdict(rl_cfg),
        "grpo": dataclasses.asdict(grpo_cfg),
        "rewards": dict(rewards.weights),
        "task": FLAGS.task_file or FLAGS.task,
      },
      f,
      indent=2,
    )
  _, variables = load_weights(FLAGS.init_from)
  metrics_path = os.path.join(FLAGS.workdir, "metrics.jsonl")

  def log(row):
    with open(metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if row["iteration"] % rl_cfg.log_every == 0 or row["iteration"] + 1 == rl_cfg.iterations:
      print(
        f"iteration {row['iteration']:4d}/{rl_cfg.iterations}  reward {row['reward/total']:.3f}"
        f"  think {row['think_rate']:.2f}  length {row['length']:.1f}  kl {row['kl']:.4f}",
        flush=True,
      )

  try:
    trained, _ = train_grpo(
      model_cfg, variables, task, rewards, rl_cfg, grpo_cfg, tokenizer=tokenizer, log=log
    )
  except RewardError as err:
    kept = save_weights(os.path.join(FLAGS.workdir, "at_error"), model_cfg, err.variables)
    print(
      f"error: iteration {err.iteration}: {err}. The policy before it is saved in {kept}",
      file=sys.stderr,
    )
    sys.exit(1)
  save_weights(os.path.join(FLAGS.workdir, "final"), model_cfg, trained)
  print(f"saved {os.path.join(FLAGS.workdir, 'final')}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
