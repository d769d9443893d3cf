r"""Rejection sampling: a model's verified replies to training problems, as SFT data.

  python -m experiments.rejection_sample --init_from=/tmp/r1/reasoning_grpo/final \
      --task=addition --tokenizer=task --num_problems=512 --samples=4 --output=/tmp/kept.jsonl

Draws --samples replies per training problem (temperature, top-p) and keeps a reply when it is
correct, has its `<think>` block and reasons in the problem's notation (r1jax.train.rejection),
at most --keep_per_problem per problem. Writes {"prompt", "response"} lines, which
`experiments.sft --data_source=sft` and `experiments.distill` read, and prints the statistics as
one JSON object. An existing --output is never overwritten (exit 2).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from r1jax.checkpoint import load_weights, read_config
from r1jax.data.tasks import TASKS, sample_problems
from r1jax.data.tokenizer import load_tokenizer_for
from r1jax.train.rejection import RejectionConfig, rejection_sample
from r1jax.train.stages import write_jsonl

_INIT = flags.DEFINE_string("init_from", None, "Weights directory or run workdir to sample.")
_TASK = flags.DEFINE_enum("task", "addition", sorted(TASKS), "Synthetic task (training split).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "bytes | task | a tokenizer.json.")
_PROBLEMS = flags.DEFINE_integer("num_problems", 512, "Training problems to sample.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Replies drawn per problem.")
_KEEP = flags.DEFINE_integer("keep_per_problem", 1, "Most distinct replies kept per problem.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_PROMPT_LEN = flags.DEFINE_integer("max_prompt_len", 16, "Prompt slots (left-padded).")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "Reply budget in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the problems and the sampling.")
_OUTPUT = flags.DEFINE_string("output", None, "The JSONL file to write (must not exist).")


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    if not _INIT.value:
      raise ValueError("--init_from: name the weights directory or run workdir to sample")
    if not _OUTPUT.value:
      raise ValueError("--output: name the JSONL file to write")
    if os.path.exists(_OUTPUT.value):
      raise ValueError(
        f"--output: {_OUTPUT.value} exists; give a new file (nothing is overwritten)"
      )
    for flag in (_PROBLEMS, _SAMPLES, _KEEP, _PROMPT_LEN, _NEW_TOKENS):
      if flag.value < 1:
        raise ValueError(f"--{flag.name}: must be >= 1, got {flag.value}")
    try:
      cfg = read_config(_INIT.value)
    except ValueError as err:
      raise ValueError(f"--init_from: {err}") from None
    tokenizer = load_tokenizer_for(_TOKENIZER.value, cfg.vocab_size)
  except ValueError as err:
    exit_on_bad_input(str(err))
  cfg, variables = load_weights(_INIT.value)
  problems = sample_problems(TASKS[_TASK.value], _SEED.value, "train", _PROBLEMS.value)
  rcfg = RejectionConfig(
    samples=_SAMPLES.value,
    keep_per_problem=_KEEP.value,
    temperature=_TEMPERATURE.value,
    top_p=_TOP_P.value,
    max_prompt_len=_PROMPT_LEN.value,
    max_new_tokens=_NEW_TOKENS.value,
    seed=_SEED.value,
  )
  records, stats = rejection_sample(cfg, variables, problems, rcfg, tokenizer=tokenizer)
  parent = os.path.dirname(os.path.abspath(_OUTPUT.value))
  os.makedirs(parent, exist_ok=True)
  write_jsonl(_OUTPUT.value, records)
  print(json.dumps({"task": _TASK.value, "output": _OUTPUT.value, **stats}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
