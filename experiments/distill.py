r"""Distillation: fine-tunes a (dense) student on a teacher's kept samples, as R1 distils into
Qwen and Llama models, then reports the student's held-out metrics.

  python -m experiments.rejection_sample --init_from=TEACHER --tokenizer=task --output=kept.jsonl
  python -m experiments.distill --student=/tmp/r1/student_base/final --samples=kept.jsonl \
      --tokenizer=task --steps=150 --workdir=/tmp/student_distilled

The samples are {"prompt", "response"} lines; the loss counts the response tokens only. The
workdir gets the run record (a replayable flags.txt), metrics, checkpoints and `final/` weights;
rerunning with the same workdir resumes. Held-out metrics (`--task`, `--eval_problems`, 0 to
skip) are printed as one JSON object and written to `WORKDIR/eval.json`.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from experiments.flagfile import replayable_flags
from r1jax.checkpoint import load_weights, read_config
from r1jax.data.tasks import TASKS
from r1jax.data.tokenizer import load_tokenizer_for
from r1jax.train import stages, trainer
from r1jax.train.evaluation import evaluate
from r1jax.train.loop import TrainConfig

_STUDENT = flags.DEFINE_string("student", None, "The student: weights directory or run workdir.")
_SAMPLES = flags.DEFINE_string("samples", None, "JSONL of the teacher's kept samples.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (resumed if it is one).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes | task | a tokenizer.json.")
_STEPS = flags.DEFINE_integer("steps", 150, "Fine-tuning steps.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (warmup, cosine).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 96, "Tokens per row (pairs are packed).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data order and the evaluation.")
_TASK = flags.DEFINE_enum("task", "addition", sorted(TASKS), "Held-out task to evaluate on.")
_EVAL = flags.DEFINE_integer("eval_problems", 128, "Held-out problems (0: no evaluation).")


def _read_samples(path: str) -> list[dict[str, str]]:
  """The {"prompt", "response"} rows; ValueError naming the file and first bad line."""
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        ok = isinstance(row, dict) and all(
          isinstance(row.get(k), str) for k in ("prompt", "response")
        )
      except json.JSONDecodeError:
        ok = False
      if not ok:
        raise ValueError(f"--samples: {path} line {number} is not a {{prompt, response}} object")
      rows.append({"prompt": row["prompt"], "response": row["response"]})
  if not rows:
    raise ValueError(f"--samples: {path} holds no sample")
  return rows


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    for flag in (_STUDENT, _SAMPLES, _WORKDIR):
      if not flag.value:
        raise ValueError(f"--{flag.name}: required")
    if not os.path.isfile(_SAMPLES.value):
      raise ValueError(f"--samples: {_SAMPLES.value} does not exist")
    records = _read_samples(_SAMPLES.value)
    try:
      cfg = read_config(_STUDENT.value)
    except ValueError as err:
      raise ValueError(f"--student: {err}") from None
    for flag in (_STEPS, _BATCH, _SEQ):
      if flag.value < 1:
        raise ValueError(f"--{flag.name}: must be >= 1, got {flag.value}")
    workdir = _WORKDIR.value
    trainer.check_workdir(workdir)
    tokenizer = load_tokenizer_for(_TOKENIZER.value, cfg.vocab_size)
  except ValueError as err:
    exit_on_bad_input(str(err))
  cfg, variables = load_weights(_STUDENT.value)
  train_cfg = TrainConfig(
    num_steps=_STEPS.value,
    batch_size=_BATCH.value,
    seq_len=_SEQ.value,
    learning_rate=_LR.value,
    warmup_steps=min(50, _STEPS.value // 10),
    seed=_SEED.value,
    log_every=max(_STEPS.value // 10, 1),
    mtp_weight=0.3 if cfg.num_nextn_predict_layers else 0.0,
  )
  header = "python -m experiments.distill --flagfile=<this file> [--workdir=NEW_DIR]"
  print(f"r1jax distill: {len(records)} samples, {_STEPS.value} steps, student {_STUDENT.value}")
  variables = stages.train_stage(
    workdir,
    cfg,
    train_cfg,
    records,
    sft=True,
    flags_text=replayable_flags(header=header),
    init_variables=variables,
    tokenizer=_TOKENIZER.value,
    save_every=max(_STEPS.value // 2, 1),
  )
  if _EVAL.value:
    metrics = evaluate(
      cfg,
      variables,
      TASKS[_TASK.value],
      num_problems=_EVAL.value,
      seed=_SEED.value,
      tokenizer=tokenizer,
    )
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(metrics, f, indent=2)
    print(json.dumps({"task": _TASK.value, **metrics}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
