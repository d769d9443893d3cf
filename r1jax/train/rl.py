"""The GRPO loop: rollouts on a task's training split, mu policy updates each, a frozen reference.

Per iteration: draw P training problems (seeded by (seed, iteration), so a run replays), sample
G completions of each at `temperature` with the current policy, score them with the reward set,
then take `updates_per_rollout` optimizer steps on the GRPO loss (r1jax.train.grpo) against the
rollout's log-probs and, with beta > 0, the reference's. The reference is the starting policy,
replaced by the current one every `reference_reset_every` iterations when that is set (R1 v2:
every 400 steps). The router's correction bias is left as it is.

Logged per iteration: the rollout's rewards per function and in total, the zero-std group
fraction, the think rate, the completion lengths (all, correct, incorrect), and the update's
loss, KL, clip fraction and grad norm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from r1jax.config import ModelConfig
from r1jax.data.tasks import Task
from r1jax.data.tokenizer import ByteTokenizer, Tokenizer
from r1jax.generate import Generator, SamplingConfig
from r1jax.model import Transformer
from r1jax.train import grpo
from r1jax.train.rewards import RewardError, RewardSet
from r1jax.train.rollout import rollout
from r1jax.train.step import TrainState


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The loop's sizes and optimizer; validated on construction."""

  iterations: int = 100
  prompts_per_iteration: int = 16  # P
  max_prompt_len: int = 16
  max_new_tokens: int = 48
  temperature: float = 1.0
  learning_rate: float = 2e-4
  seed: int = 0
  log_every: int = 10

  def __post_init__(self):
    for name in ("iterations", "prompts_per_iteration", "max_prompt_len", "max_new_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
    if not self.temperature > 0:
      raise ValueError(f"temperature: GRPO samples, so it must be > 0, got {self.temperature}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")


def train_grpo(
  model_cfg: ModelConfig,
  variables: dict[str, Any],
  task: Task,
  rewards: RewardSet,
  rl_cfg: RLConfig,
  grpo_cfg: grpo.GRPOConfig,
  *,
  tokenizer: Tokenizer | None = None,
  log: Callable[[dict[str, float]], None] = lambda row: None,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
  """Runs the loop from `variables` ({"params", "router_bias"}); returns the trained variables
  and one metrics row per iteration (also passed to `log`).

  Raises:
    RewardError: a reward function failed; its `iteration` and `variables` (the policy before
      that rollout) are set, so that nothing trained is lost.
  """
  tokenizer = tokenizer or ByteTokenizer()
  model = Transformer(model_cfg)
  generator = Generator(
    model_cfg,
    max_prompt_len=rl_cfg.max_prompt_len,
    max_new_tokens=rl_cfg.max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id or 0,
  )
  optimizer = optax.adam(rl_cfg.learning_rate, b1=0.9, b2=0.99)
  params, router_bias = variables["params"], variables.get("router_bias", {})
  state = TrainState(jnp.zeros((), jnp.int32), params, router_bias, optimizer.init(params))
  update = grpo.make_policy_update(model, optimizer, grpo_cfg, rl_cfg.temperature)
  reference_logp = jax.jit(
    lambda v, b: grpo.completion_logprobs(
      model, v, b["tokens"], b["positions"], b["segment_ids"], rl_cfg.temperature
    )
  )
  reference = {"params": params, "router_bias": router_bias}
  sampling = SamplingConfig(temperature=rl_cfg.temperature)
  rng = jax.random.key(rl_cfg.seed)
  history = []
  for it in range(rl_cfg.iterations):
    problem_rng = np.random.default_rng([rl_cfg.seed, it])
    problems = [task.sample(problem_rng, "train") for _ in range(rl_cfg.prompts_per_iteration)]
    rng, key = jax.random.split(rng)
    current = {"params": state.params, "router_bias": state.router_bias}
    try:
      host_batch, row = rollout(
        generator, current, problems, tokenizer, rewards, grpo_cfg, key, sampling
      )
    except RewardError as err:  # hand the policy trained so far to the caller
      err.iteration, err.variables = it, current
      raise
    batch = jax.tree.map(jnp.asarray, host_batch)
    if grpo_cfg.beta > 0:
      batch["ref_logp"] = reference_logp(reference, batch)
    else:
      batch["ref_logp"] = jnp.zeros_like(batch["old_logp"])
    for _ in range(grpo_cfg.updates_per_rollout):
      state, metrics = update(state, batch)
    row = {"iteration": it, **row, **{k: float(v) for k, v in metrics.items()}}
    history.append(row)
    log(row)
    reset = grpo_cfg.reference_reset_every
    if reset and (it + 1) % reset == 0:
      reference = {"params": state.params, "router_bias": state.router_bias}
  return {"params": state.params, "router_bias": state.router_bias}, history
