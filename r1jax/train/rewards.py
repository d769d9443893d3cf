"""Rule-based rewards for GRPO, computed from (problem, completion text), and their weighted sum.

A completion is the model's reply text, cut at the first EOS (`decode_completion` does that for
token ids). Scoring only up to EOS stops a model from being paid for text after its end.
Each reward function maps (problem, completion) to a float:

- `accuracy`: 1.0 when the answer block verifies under the problem's task (`tasks.verify`),
  else 0.0. It reads the block that `tasks.parse_completion` extracts leniently, so that it
  measures correctness apart from format. `strict=True` also requires a well-formed reply.
- `format`: 1.0 when the reply is well formed (`tasks.parse_completion`), `<think>` optional.
  `format_think` is the same with `<think>` required, R1-Zero's format reward.
- `language`: R1's language-consistency reward in miniature. It is the fraction of the
  chain of thought's number units written in the problem's target notation (`problem.notation`
  for chains, "numeral" for the tasks whose traces are numerals). Units are counted in the think
  block's contents:
    numeral units: each ASCII digit character ("21" is 2 units),
    word units:    each maximal run of ASCII letters that is a digit word, case-insensitive
                   ("two one" is 2 units; the "x" of "x=x+5" and "someone" are not units).
  Both notations therefore give a value one unit per decimal digit. The reward is
  target units / (numeral + word units), and 0.0 when there is no think block or it holds no
  units: a chain of thought that writes no numbers shows no notation to reward.

`RewardSet(weights)` (or `combine(weights)`) scores a batch of completions. It returns each
function's rewards, which are logged as "reward per function", and the weighted total
sum_k w_k * r_k that GRPO's advantages use. R1-Zero weighs accuracy and format equally; R1's
reasoning RL adds the language reward to accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from r1jax.data.tasks import DIGIT_WORDS, NOTATIONS, Problem, parse_completion, verify
from r1jax.data.tokenizer import Tokenizer

RewardFn = Callable[[Problem, str], float]

_LETTER_RUN = re.compile(r"[A-Za-z]+")


def decode_completion(ids: Iterable[int], tokenizer: Tokenizer) -> str:
  """The text of sampled ids up to, not including, the first EOS (all of them if none)."""
  ids = [int(i) for i in ids]
  if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def accuracy_reward(problem: Problem, completion: str, *, strict: bool = False) -> float:
  """1.0 if the extracted answer verifies (and, if `strict`, the reply is well formed)."""
  parsed = parse_completion(completion)
  if parsed.answer is None or (strict and not parsed.well_formed):
    return 0.0
  return float(verify(problem, parsed.answer))


def format_reward(problem: Problem, completion: str, *, require_think: bool = False) -> float:
  """1.0 if the reply is `[<think>...</think>]<answer>...</answer>` and nothing else."""
  del problem  # Format does not depend on the problem; the signature is every reward's.
  return float(parse_completion(completion, require_think=require_think).well_formed)


def notation_units(text: str) -> dict[str, int]:
  """{"numeral": ASCII digits, "words": digit-word letter runs} counted in `text`."""
  words = sum(run.lower() in DIGIT_WORDS for run in _LETTER_RUN.findall(text))
  return {"numeral": sum(c in "0123456789" for c in text), "words": words}


def language_consistency(think: str | None, notation: str) -> float:
  """Fraction of the number units of `think` written in `notation` (see the module docstring).

  Raises:
    ValueError: an unknown notation.
  """
  if notation not in NOTATIONS:
    raise ValueError(f"notation: unknown {notation!r}; choose one of {NOTATIONS}")
  if think is None:
    return 0.0
  units = notation_units(think)
  total = units["numeral"] + units["words"]
  return units[notation] / total if total else 0.0


def language_reward(problem: Problem, completion: str) -> float:
  """`language_consistency` of the completion's think block in the problem's notation."""
  notation = getattr(problem, "notation", "numeral")
  return language_consistency(parse_completion(completion).think, notation)


REWARD_FUNCTIONS: dict[str, RewardFn] = {
  "accuracy": accuracy_reward,
  "accuracy_strict": functools.partial(accuracy_reward, strict=True),
  "format": format_reward,
  "format_think": functools.partial(format_reward, require_think=True),
  "language": language_reward,
}


class RewardError(RuntimeError):
  """A reward function raised or returned a non-finite value. The message names the function,
  the problem and the completion; a training loop attaches `iteration` and `variables` (the
  policy before the failing rollout) so that its caller can keep them."""

  iteration: int | None = None
  variables: dict | None = None


def _score(name: str, fn: RewardFn, problem: Problem, completion: str) -> float:
  try:
    value = float(fn(problem, completion))
  except Exception as err:  # a user's reward function may raise anything: name it and the item
    raise RewardError(
      f"reward {name!r} raised {type(err).__name__}: {err} on problem {problem.prompt!r}, "
      f"completion {completion[:80]!r}"
    ) from err
  if not np.isfinite(value):
    raise RewardError(
      f"reward {name!r} returned {value} on problem {problem.prompt!r}, completion "
      f"{completion[:80]!r}; rewards must be finite"
    )
  return value


class Rewards(NamedTuple):
  """A batch's rewards: the weighted `total` [N] and each function's rewards [N], float32."""

  total: np.ndarray
  per_function: dict[str, np.ndarray]

  def means(self, prefix: str = "reward/") -> dict[str, float]:
    """Batch means for logging: `{prefix}{name}` per function and `{prefix}total`."""
    out = {f"{prefix}{k}": float(v.mean()) for k, v in self.per_function.items()}
    out[f"{prefix}total"] = float(self.total.mean())
    return out


@dataclasses.dataclass(frozen=True)
class RewardSet:
  """Weighted reward functions; calling it scores a batch.

  Attributes:
    weights: {function name: weight}. A weight of 0 still computes and logs the function.
    functions: where the names are looked up; `REWARD_FUNCTIONS` by default. Custom entries take
      (problem, completion) and return a float.
  """

  weights: Mapping[str, float]
  functions: Mapping[str, RewardFn] = dataclasses.field(
    default_factory=lambda: dict(REWARD_FUNCTIONS)
  )

  def __post_init__(self):
    if not self.weights:
      raise ValueError("reward weights: empty; name at least one of " + str(sorted(self.functions)))
    unknown = sorted(set(self.weights) - set(self.functions))
    if unknown:
      raise ValueError(f"reward weights: unknown {unknown}; choose from {sorted(self.functions)}")

  def __call__(
    self, problems: Sequence[Problem], completions: Sequence[str], *, group_size: int = 1
  ) -> Rewards:
    """Scores `completions` [N]. Completion i answers problems[i // group_size], so GRPO's
    P prompts x G samples pass the P problems once with group_size=G.

    Raises:
      ValueError: len(completions) != len(problems) * group_size.
      RewardError: a function raised or returned a non-finite value (named, with the item).
    """
    if group_size < 1 or len(completions) != len(problems) * group_size:
      raise ValueError(
        f"rewards: {len(completions)} completions for {len(problems)} problems x group_size "
        f"{group_size}; need exactly problems x group_size"
      )
    per_function = {
      name: np.asarray(
        [
          _score(name, self.functions[name], problems[i // group_size], c)
          for i, c in enumerate(completions)
        ],
        np.float32,
      ).reshape(len(completions))
      for name in self.weights
    }
    total = np.zeros(len(completions), np.float32)
    for name, weight in self.weights.items():
      total += np.float32(weight) * per_function[name]
    return Rewards(total, per_function)


def combine(
  weights: Mapping[str, float], functions: Mapping[str, RewardFn] | None = None
) -> RewardSet:
  """`RewardSet(weights, functions)`, e.g. combine({"accuracy": 1.0, "format_think": 1.0}) for
  R1-Zero, or combine({"accuracy": 1.0, "language": 1.0}) for R1's reasoning RL."""
  return RewardSet(dict(weights), dict(REWARD_FUNCTIONS if functions is None else functions))
