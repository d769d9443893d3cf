r"""Held-out metrics of a model on a synthetic task: pass@1 over k samples, pass@k, greedy
accuracy, format and think rates, mean lengths (r1jax.train.evaluation).

  python -m experiments.evaluate --init_from=/tmp/run --task=addition --num_problems=128 \
      --samples=4

`--init_from` is an r1jax weights directory or a training run's workdir. Prints one JSON object.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from r1jax.checkpoint import load_weights, read_config
from r1jax.data.tasks import TASKS
from r1jax.train.evaluation import evaluate

_INIT = flags.DEFINE_string("init_from", None, "Weights directory or run workdir to evaluate.")
_TASK = flags.DEFINE_enum("task", "addition", sorted(TASKS), "Synthetic task.")
_PROBLEMS = flags.DEFINE_integer("num_problems", 128, "Held-out problems.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per problem (pass@1 averages them).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_PROMPT_LEN = flags.DEFINE_integer("max_prompt_len", 16, "Prompt slots (left-padded).")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 48, "Reply budget in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out draw and the sampling.")


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    if not _INIT.value:
      raise ValueError("--init_from: name the weights directory or run workdir to evaluate")
    for flag in (_PROBLEMS, _SAMPLES, _PROMPT_LEN, _NEW_TOKENS):
      if flag.value < 1:
        raise ValueError(f"--{flag.name}: must be >= 1, got {flag.value}")
    try:
      read_config(_INIT.value)
    except ValueError as err:
      raise ValueError(f"--init_from: {err}") from None
  except ValueError as err:
    exit_on_bad_input(str(err))
  cfg, variables = load_weights(_INIT.value)
  metrics = evaluate(
    cfg,
    variables,
    TASKS[_TASK.value],
    num_problems=_PROBLEMS.value,
    samples=_SAMPLES.value,
    temperature=_TEMPERATURE.value,
    top_p=_TOP_P.value,
    max_prompt_len=_PROMPT_LEN.value,
    max_new_tokens=_NEW_TOKENS.value,
    seed=_SEED.value,
  )
  print(json.dumps({"task": _TASK.value, **metrics}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
