"""GRPO rollouts: the laid-out rows recompute the sampler's log-probs; advantages per group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.data.tasks import TASKS, sample_problems
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.generate import Generator, SamplingConfig
from r1jax.model import Transformer
from r1jax.train import grpo
from r1jax.train.rewards import RewardSet
from r1jax.train.rollout import rollout

CFG = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)


def test_rollout_rows_recompute_the_sampled_logprobs_and_normalise_per_group():
  tok = ByteTokenizer()
  model = Transformer(CFG)
  variables = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  problems = sample_problems(TASKS["addition"], seed=0, split="train", count=3)
  generator = Generator(CFG, max_prompt_len=16, max_new_tokens=10, eos_id=tok.eos_id)
  # The completion's length as the reward: groups differ, so advantages are not all 0.
  rewards = RewardSet({"chars": 1.0}, {"chars": lambda problem, text: float(len(text))})
  cfg = grpo.GRPOConfig(group_size=4)
  sampling = SamplingConfig(temperature=0.8)
  batch, metrics = rollout(
    generator, variables, problems, tok, rewards, cfg, jax.random.key(1), sampling
  )
  n, s = batch["tokens"].shape
  assert (n, s) == (12, 26) and batch["mask"].shape == (12, 25)
  recomputed = grpo.completion_logprobs(
    model,
    variables,
    jnp.asarray(batch["tokens"]),
    jnp.asarray(batch["positions"]),
    jnp.asarray(batch["segment_ids"]),
    sampling.temperature,
  )
  m = batch["mask"].astype(bool)
  assert m.sum() > 12  # several completion tokens per row
  np.testing.assert_allclose(np.asarray(recomputed)[m], batch["old_logp"][m], atol=1e-5)
  # Each row's prompt is its problem's, G rows per problem, right-aligned at slot 15.
  for i, problem in enumerate(problems):
    for j in range(4):
      row = batch["tokens"][4 * i + j]
      assert bytes(row[16 - len(problem.prompt) : 16].tolist()).decode() == problem.prompt
  adv = batch["advantages"].reshape(3, 4)
  np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-5)
  assert set(metrics) >= {"reward/chars", "reward/total", "zero_std_groups", "think_rate", "length"}
  assert metrics["reward/total"] == pytest.approx(metrics["reward/chars"])
