"""The GRPO loop learns what its reward pays for, from a random tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


@pytest.mark.slow
def test_a_failing_reward_names_the_item_and_hands_back_the_policy_so_far():
  """The reward raises on the third rollout: the error names the function and the problem, and
  carries the policy after two iterations (trained, so not the initial weights)."""
  from r1jax.train.rewards import RewardError

  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  calls = []

  def fragile(problem, text):
    calls.append(problem.prompt)
    if len(calls) > 2 * 4 * 2:  # two rollouts of 2 prompts x 4 samples, then it breaks
      raise KeyError("no such field")
    return _digit_fraction(problem, text)

  rewards = RewardSet({"fragile": 1.0}, {"fragile": fragile})
  rl_cfg = RLConfig(iterations=4, prompts_per_iteration=2, max_new_tokens=4, learning_rate=3e-3)
  grpo_cfg = grpo.GRPOConfig(group_size=4, beta=0.0)
  with pytest.raises(RewardError, match=r"reward 'fragile' raised KeyError.*on problem '") as info:
    train_grpo(cfg, variables, TASKS["addition"], rewards, rl_cfg, grpo_cfg)
  assert calls[-1] in str(info.value)
  assert info.value.iteration == 2
  moved = jax.tree.map(
    lambda a, b: float(jnp.abs(a - b).max()), info.value.variables["params"], variables["params"]
  )
  assert max(jax.tree.leaves(moved)) > 0  # two updates were made and are handed back
