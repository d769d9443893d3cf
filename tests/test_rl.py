"""The GRPO loop learns what its reward pays for, from a random tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.data.tasks import TASKS
from r1jax.model import Transformer
from r1jax.train import grpo
from r1jax.train.rewards import RewardSet
from r1jax.train.rl import RLConfig, train_grpo


def _digit_fraction(problem, text):
  return sum(c.isdigit() for c in text) / max(len(text), 1)


def test_grpo_raises_the_reward_it_is_given():
  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  rewards = RewardSet({"digits": 1.0}, {"digits": _digit_fraction})
  rl_cfg = RLConfig(
    iterations=16,
    prompts_per_iteration=4,
    max_prompt_len=16,
    max_new_tokens=8,
    learning_rate=3e-3,
    seed=0,
  )
  grpo_cfg = grpo.GRPOConfig(group_size=8, beta=0.01, reference_reset_every=8)
  _, history = train_grpo(cfg, variables, TASKS["addition"], rewards, rl_cfg, grpo_cfg)
  reward = [row["reward/total"] for row in history]
  assert len(history) == 16 and all(np.isfinite(row["kl"]) for row in history)
  first, last = np.mean(reward[:4]), np.mean(reward[-4:])
  assert last > first + 0.1, reward  # digits: ~4% of a random byte model's output at first
