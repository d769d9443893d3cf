"""GRPO rollouts: sample G completions per prompt, score them, and lay them out for the update.

Dims: P prompts, G completions each, N = P * G rows; Sp prompt slots (left-padded), Sc
completion slots, S = Sp + Sc.

A rollout row is the prompt (left-padded to Sp) followed by the sampled completion, so that one
full forward recomputes exactly what the sampler drew from:
  tokens       [N, S]      prompt, then completion tokens (pad_id after EOS)
  positions    [N, S]      each row counts from its first real prompt token
  segment_ids  [N, S]      1 on real prompt tokens and completion tokens through EOS, else 0
  mask         [N, S - 1]  target slot j + 1 counts: a completion token through EOS
  old_logp     [N, S - 1]  the sampler's tempered log-probs of those targets, 0 elsewhere
  advantages   [N]         group-normalised total rewards (r1jax.train.grpo)
With one update per rollout the sampler's log-probs are pi_old's (they equal a recomputation to
< 1e-5: tests/test_generate.py), so no extra forward is needed for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from r1jax.data.tasks import Problem, parse_completion
from r1jax.data.tokenizer import Tokenizer
from r1jax.generate import Generation, Generator, SamplingConfig, pad_prompts
from r1jax.train import grpo
from r1jax.train.rewards import RewardSet, decode_completion


def layout(prompts: np.ndarray, lengths: np.ndarray, gen: Generation) -> dict[str, np.ndarray]:
  """The rollout rows of left-padded prompts [N, Sp] (real lengths [N]) and their generation."""
  n, sp = prompts.shape
  sc = gen.tokens.shape[1]
  comp_mask = np.asarray(gen.mask, np.int32)
  tokens = np.concatenate([prompts, np.asarray(gen.tokens, np.int32)], axis=1)
  slot = np.arange(sp + sc)[None, :]
  first = sp - lengths[:, None]
  positions = np.maximum(slot - first, 0).astype(np.int32)
  segment_ids = np.concatenate([(slot[:, :sp] >= first), comp_mask], axis=1).astype(np.int32)
  mask = np.zeros((n, sp + sc - 1), np.int32)
  mask[:, sp - 1 :] = comp_mask  # target slot j + 1 = sp + t is completion token t
  old_logp = np.zeros((n, sp + sc - 1), np.float32)
  old_logp[:, sp - 1 :] = np.asarray(gen.logprobs, np.float32) * comp_mask
  return {
    "tokens": tokens,
    "positions": positions,
    "segment_ids": segment_ids,
    "mask": mask,
    "old_logp": old_logp,
  }


def rollout(
  generator: Generator,
  variables: dict[str, Any],
  problems: Sequence[Problem],
  tokenizer: Tokenizer,
  rewards: RewardSet,
  cfg: grpo.GRPOConfig,
  rng,
  sampling: SamplingConfig,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """G completions of each problem's prompt -> (the update's batch, rollout metrics).

  Metrics: each reward function's mean ("reward/<name>") and the total's, the fraction of
  groups whose rewards are all equal, the think rate, and the mean completion length over the
  correct and the incorrect completions (accuracy > 0).
  """
  g = cfg.group_size
  encoded = [tokenizer.encode(p.prompt) for p in problems for _ in range(g)]
  prompts, lengths = pad_prompts(encoded, generator.max_prompt_len, generator.pad_id)
  gen = jax.device_get(generator(variables, prompts, lengths, rng, sampling))
  texts = [decode_completion(row, tokenizer) for row in np.asarray(gen.tokens)]
  scored = rewards(problems, texts, group_size=g)
  total = np.asarray(scored.total, np.float32).reshape(len(problems), g)
  advantages, zero_std = grpo.group_advantages(total, cfg.scale_advantages, cfg.advantage_eps)
  batch = layout(prompts, lengths, gen)
  batch["advantages"] = np.asarray(advantages, np.float32).reshape(-1)
  if cfg.drop_zero_std_groups:  # their advantages are 0 already; drop their tokens from the mean
    keep = np.repeat(~np.asarray(zero_std), g)
    batch["mask"] = batch["mask"] * keep[:, None]
  correct = scored.per_function.get("accuracy", scored.total) > 0
  length = np.asarray(gen.lengths, np.float64)
  metrics = {**scored.means(prefix="reward/"), "reward/total": float(np.mean(scored.total))}
  metrics["zero_std_groups"] = float(np.mean(zero_std))
  metrics["think_rate"] = float(np.mean([parse_completion(t).think is not None for t in texts]))
  metrics["length"] = float(length.mean())
  metrics["length_correct"] = float(length[correct].mean()) if correct.any() else float("nan")
  metrics["length_incorrect"] = float(length[~correct].mean()) if (~correct).any() else float("nan")
  return batch, metrics
