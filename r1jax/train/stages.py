"""The R1 recipe's stages as library calls, each in its own directory (`experiments.r1_pipeline`).

A stage directory holds its run record (flags.txt, config.json, run_info.json), its metrics
(metrics.jsonl), its checkpoints or data, its trained weights in `final/` (a weights directory
that `--init_from` and `r1jax.checkpoint.load_weights` read), and, once everything is written,
`stage.json` with the stage's result (held-out metrics, statistics). `stage.json` is written
last and atomically, so its presence is what "finished" means: a pipeline that was killed
skips the finished stages and restarts the unfinished one (a training stage from its newest
checkpoint; a GRPO or sampling stage from its start, after setting the partial one aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from r1jax.checkpoint import load_weights, save_weights
from r1jax.config import ModelConfig
from r1jax.data.pipeline import DataConfig, make_pipeline
from r1jax.data.tasks import Task
from r1jax.data.tokenizer import Tokenizer
from r1jax.train import grpo, trainer
from r1jax.train.loop import TrainConfig
from r1jax.train.rewards import RewardError, RewardSet
from r1jax.train.rl import RLConfig, train_grpo

STAGES = (
  "base",
  "r1_zero",
  "cold_start_sft",
  "reasoning_grpo",
  "rejection_sampling",
  "rejection_sft",
  "student_base",
  "student_distilled",
)
EVAL_METRICS = (
  "pass@1",
  "pass@k",
  "greedy_acc",
  "think_rate",
  "format_rate",
  "mean_length",
  "think_acc",
)
RESULT_FILE = "stage.json"
FINAL_DIR = "final"


def finished(directory: str) -> dict[str, Any] | None:
  """The result a finished stage wrote, or None."""
  path = os.path.join(directory, RESULT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def finish(directory: str, result: dict[str, Any]) -> dict[str, Any]:
  """Writes `stage.json` atomically (the stage's last act) and returns the result."""
  tmp = os.path.join(directory, RESULT_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, os.path.join(directory, RESULT_FILE))
  return result


def restart(directory: str) -> None:
  """Sets an unfinished stage's directory aside (renamed, never deleted) for a fresh start."""
  if os.path.isdir(directory) and os.listdir(directory):
    aside = f"{directory}.unfinished-{int(time.time())}"
    os.replace(directory, aside)
  os.makedirs(directory, exist_ok=True)


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
  return path


def train_stage(
  directory: str,
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  rows: Sequence[dict[str, str]],
  *,
  sft: bool,
  flags_text: str,
  init_variables: dict[str, Any] | None = None,
  tokenizer: str = "bytes",
  save_every: int = 100,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains `model_cfg` on `rows` with `r1jax.train.trainer.run` and returns the final variables.

  rows: {"text"} documents (pretraining: every token counts) or, with `sft`, {"prompt",
  "response"} pairs (only the response counts). They are written once to `data.jsonl` and read
  through the data pipeline (packed, shuffled, endless), so a resumed stage continues the same
  order from its checkpoint.
  """
  os.makedirs(directory, exist_ok=True)
  data_file = os.path.join(directory, "data.jsonl")
  if not os.path.isfile(data_file):
    write_jsonl(data_file, rows)
  data_cfg = DataConfig(
    source="sft" if sft else "jsonl",
    data_files=(data_file,),
    tokenizer=tokenizer,
    seq_len=train_cfg.seq_len,
    batch_size=train_cfg.batch_size,
    seed=train_cfg.seed,
  )
  if not os.path.isfile(os.path.join(directory, "flags.txt")):
    trainer.write_run_record(directory, flags_text, model_cfg, train_cfg, None, data_cfg)
  data = make_pipeline(data_cfg, vocab_size=model_cfg.vocab_size)
  run_cfg = trainer.RunConfig(directory, save_every=save_every, keep=1)
  trainer.run(model_cfg, train_cfg, run_cfg, data=data, init_variables=init_variables, log=log)
  _, variables = load_weights(directory)  # the newest checkpoint: the final step
  final = os.path.join(directory, FINAL_DIR)
  if os.path.isdir(final):  # a previous attempt died after saving: the same weights
    shutil.rmtree(final)
  save_weights(final, model_cfg, variables)
  return variables


def grpo_stage(
  directory: str,
  model_cfg: ModelConfig,
  variables: dict[str, Any],
  task: Task,
  rewards: RewardSet,
  rl_cfg: RLConfig,
  grpo_cfg: grpo.GRPOConfig,
  *,
  flags_text: str,
  tokenizer: Tokenizer | None = None,
  log: Callable[[dict[str, float]], None] = lambda row: None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
  """GRPO from `variables` (`r1jax.train.rl.train_grpo`), with its run record, metrics.jsonl
  and final weights in `directory` (which must be fresh: see `restart`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "flags.txt"), "w") as f:
    f.write(flags_text)
  record = {
    "model": dataclasses.asdict(model_cfg),
    "rl": dataclasses.asdict(rl_cfg),
    "grpo": dataclasses.asdict(grpo_cfg),
    "rewards": dict(rewards.weights),
    "task": repr(task),
  }
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(directory, "run_info.json"), "w") as f:
    json.dump(trainer.run_info(None), f, indent=2)
  metrics = os.path.join(directory, "metrics.jsonl")

  def write(row):
    with open(metrics, "a") as f:
      f.write(json.dumps(row) + "\n")
    log(row)

  try:
    trained, history = train_grpo(
      model_cfg, variables, task, rewards, rl_cfg, grpo_cfg, tokenizer=tokenizer, log=write
    )
  except RewardError as err:  # keep the policy trained so far, then stop the pipeline
    kept = save_weights(os.path.join(directory, "at_error"), model_cfg, err.variables)
    raise RewardError(
      f"iteration {err.iteration}: {err}. The policy before it is in {kept}"
    ) from err
  save_weights(os.path.join(directory, FINAL_DIR), model_cfg, trained)
  return trained, history


def final_weights(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
  """(cfg, variables) a finished stage left in `final/`."""
  return load_weights(os.path.join(directory, FINAL_DIR))


def table(results: dict[str, dict]) -> str:
  """One row per stage; "-" where a stage has no such metric (think_acc is measured on the
  pretrained models only), nan seconds for a stage that did not run."""
  head = f"{'stage':<19}" + "".join(f"{m:>12}" for m in EVAL_METRICS) + f"{'seconds':>9}"
  lines = [head, "-" * len(head)]
  for stage in STAGES:
    r = results.get(stage, {})
    if stage == "rejection_sampling":
      lines.append(
        f"{stage:<19}{'kept ' + str(int(r.get('records', 0))):>12}"
        + " " * 12 * (len(EVAL_METRICS) - 1)
        + f"{r.get('seconds', math.nan):9.0f}"
      )
      continue
    lines.append(
      f"{stage:<19}"
      + "".join(f"{r[m]:12.3f}" if m in r else f"{'-':>12}" for m in EVAL_METRICS)
      + f"{r.get('seconds', math.nan):9.0f}"
    )
  return "\n".join(lines)
