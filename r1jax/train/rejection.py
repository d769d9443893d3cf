"""Rejection sampling: a model's own verified reasoning traces, as SFT data.

R1's third stage samples many replies to each training prompt from the RL checkpoint and keeps
only those that are correct, readable and in the expected language; the kept pairs (plus
non-reasoning data, which the miniature has none of) train a model again from the base, and
the same kind of data distils the reasoning into smaller dense models.

Here, for each training problem, `samples` replies are drawn (temperature, top-p) and a reply is
kept when it is correct (`tasks.verify` on its answer block), well formed with a `<think>`
block, and its chain of thought is entirely in the problem's target notation (the language
reward is 1.0). At most `keep_per_problem` distinct replies of a problem are kept, so that the
easy problems do not crowd out the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from r1jax.config import ModelConfig
from r1jax.data.tasks import Problem, parse_completion
from r1jax.data.tokenizer import ByteTokenizer, Tokenizer
from r1jax.generate import Generator, SamplingConfig, pad_prompts
from r1jax.train.rewards import accuracy_reward, decode_completion, language_reward


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
  """How many replies are drawn and kept, and how they are sampled."""

  samples: int = 8
  keep_per_problem: int = 1
  temperature: float = 0.7
  top_p: float = 0.95
  max_prompt_len: int = 16
  max_new_tokens: int = 48
  batch_size: int = 256  # replies generated per compiled call
  seed: int = 0

  def __post_init__(self):
    for name in ("samples", "keep_per_problem", "max_prompt_len", "max_new_tokens", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
    if not self.temperature > 0:
      raise ValueError(
        f"temperature: rejection sampling samples, needs > 0, got {self.temperature}"
      )


def accept(problem: Problem, completion: str) -> bool:
  """Correct, well formed with a <think> block, and the thought in the target notation."""
  parsed = parse_completion(completion, require_think=True)
  return (
    parsed.well_formed
    and accuracy_reward(problem, completion) == 1.0
    and language_reward(problem, completion) == 1.0
  )


def select(
  problems: Sequence[Problem], owners: Sequence[int], texts: Sequence[str], keep_per_problem: int
) -> tuple[list[dict[str, str]], int]:
  """The kept {"prompt", "response"} records (by problem, then in sampling order) and how many
  replies were accepted; texts[i] is a reply to problems[owners[i]]."""
  kept: dict[int, list[str]] = {}
  accepted = 0
  for owner, text in zip(owners, texts, strict=True):
    if not accept(problems[owner], text):
      continue
    accepted += 1
    replies = kept.setdefault(owner, [])
    if text not in replies and len(replies) < keep_per_problem:
      replies.append(text)
  records = [
    {"prompt": problems[i].prompt, "response": reply} for i in sorted(kept) for reply in kept[i]
  ]
  return records, accepted


def rejection_sample(
  model_cfg: ModelConfig,
  variables: dict[str, Any],
  problems: Sequence[Problem],
  cfg: RejectionConfig,
  *,
  tokenizer: Tokenizer | None = None,
  progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[dict[str, str]], dict[str, float]]:
  """The kept {"prompt", "response"} records, in problem order, and statistics:
  {"problems", "samples", "accepted_fraction" (of all replies), "problems_kept" (fraction of
  problems with at least one kept reply), "records"}."""
  tokenizer = tokenizer or ByteTokenizer()
  generator = Generator(
    model_cfg,
    max_prompt_len=cfg.max_prompt_len,
    max_new_tokens=cfg.max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id or 0,
  )
  sampling = SamplingConfig(cfg.temperature, top_p=cfg.top_p)
  owners = [i for i in range(len(problems)) for _ in range(cfg.samples)]
  texts: list[str] = []
  rng = jax.random.key(cfg.seed)
  batch = min(cfg.batch_size, len(owners))
  for start in range(0, len(owners), batch):
    chunk = owners[start : start + batch]
    # Every call has the same batch shape (the last one padded with repeats): one compile.
    padded = chunk + [chunk[-1]] * (batch - len(chunk))
    encoded = [tokenizer.encode(problems[i].prompt) for i in padded]
    prompts, lengths = pad_prompts(encoded, cfg.max_prompt_len, generator.pad_id)
    rng, key = jax.random.split(rng)
    tokens = np.asarray(
      jax.device_get(generator(variables, prompts, lengths, key, sampling).tokens)
    )
    texts += [decode_completion(row, tokenizer) for row in tokens[: len(chunk)]]
    progress(len(texts), len(owners))
  records, accepted = select(problems, owners, texts, cfg.keep_per_problem)
  stats = {
    "problems": float(len(problems)),
    "samples": float(len(texts)),
    "accepted_fraction": accepted / max(len(texts), 1),
    "problems_kept": len({r["prompt"] for r in records}) / max(len(problems), 1),
    "records": float(len(records)),
  }
  return records, stats
