"""GRPO's objective on small tensors against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax.train import grpo


def test_group_advantages_normalise_within_each_group():
  rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 1.0]]
  adv, zero_std = grpo.group_advantages(rewards, scale=True, eps=0.0)
  # Group 0: mean 0.5, std 0.5. Group 2: mean 1, std sqrt((4 + 1 + 1 + 0) / 4).
  np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-6)
  np.testing.assert_allclose(adv[1], [0, 0, 0, 0])
  np.testing.assert_allclose(adv[2], np.array([2, -1, -1, 0]) / math.sqrt(1.5), rtol=1e-6)
  assert zero_std.tolist() == [False, True, False]
  centred, _ = grpo.group_advantages(rewards, scale=False)
  np.testing.assert_allclose(centred[0], [0.5, -0.5, -0.5, 0.5])


def test_mask_counts_tokens_through_the_first_eos_only():
  tokens = [[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 2, 3, 4, 5]]
  want = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
  np.testing.assert_array_equal(grpo.mask_after_eos(jnp.asarray(tokens), eos_id=1), want)
  valid = np.ones((3, 5), np.int32)
  valid[1, 3:] = 0
  got = grpo.mask_after_eos(jnp.asarray(tokens), eos_id=1, valid=valid)
  np.testing.assert_array_equal(got[1], [1, 1, 1, 0, 0])


def test_kl_estimators_by_hand():
  logp, ref = jnp.log(jnp.asarray([0.5, 0.3])), jnp.log(jnp.asarray([0.25, 0.3]))
  k3 = grpo.kl_per_token(logp, ref, "k3")
  assert float(k3[0]) == pytest.approx(0.5 - math.log(0.5) - 1)  # exp(d) - d - 1, d = log 1/2
  assert float(k3[1]) == pytest.approx(0.0, abs=1e-7)
  k2 = grpo.kl_per_token(logp, ref, "k2")
  assert float(k2[0]) == pytest.approx(0.5 * math.log(2) ** 2)
  # k3's gradient in logp is 1 - exp(ref - logp): zero where the policy equals the reference.
  g = jax.grad(lambda lp: grpo.kl_per_token(lp, ref, "k3").sum())(logp)
  np.testing.assert_allclose(g, [1 - 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("how, want", [("grpo", 3.0), ("dapo", 2.5), ("dr_grpo", 10 / 8)])
def test_aggregations(how, want):
  values = jnp.asarray([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]])
  # grpo: mean(mean(1, 2, 3), 4) = 3; dapo: 10 / 4 tokens; dr_grpo: 10 / (2 x 4).
  assert float(grpo.aggregate(values, mask, how)) == pytest.approx(want)


def test_clipping_binds_only_where_it_limits_the_update():
  cfg = grpo.GRPOConfig(eps_low=0.2, eps_high=0.28, beta=0.0, loss_aggregation="dapo")
  ratios = jnp.asarray([[1.5, 0.5], [0.5, 1.5]])
  logp = jnp.log(ratios)  # old log-probs 0: the ratio is exp(logp)
  adv = jnp.asarray([1.0, -1.0])
  mask = jnp.ones((2, 2), jnp.int32)
  loss, m = grpo.grpo_loss(logp, jnp.zeros_like(logp), None, adv, mask, cfg)
  # A=+1: min(1.5, 1.28) = 1.28 (binds), min(0.5, 0.8) = 0.5. A=-1: min(-0.5, -0.8) = -0.8
  # (binds), min(-1.5, -1.28) = -1.5.
  assert float(loss) == pytest.approx(-(1.28 + 0.5 - 0.8 - 1.5) / 4)
  assert float(m["clip_fraction"]) == pytest.approx(0.5)
  assert float(m["kl"]) == 0.0


def test_one_update_per_rollout_is_the_policy_gradient_plus_kl():
  """mu = 1: logp == old_logp, so each token's surrogate is its advantage and its gradient -A
  (over the token count), plus beta times the k3 terms."""
  rng = np.random.default_rng(0)
  logp = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (3, 4))), jnp.float32)
  ref = jnp.asarray(np.log(rng.uniform(0.1, 0.9, (3, 4))), jnp.float32)
  adv = jnp.asarray([1.0, -0.5, 0.0])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  cfg = grpo.GRPOConfig(beta=0.1, loss_aggregation="dapo")
  loss_fn = lambda lp: grpo.grpo_loss(lp, lp, ref, adv, mask, cfg)[0]  # noqa: E731
  k3 = np.exp(np.asarray(ref - logp)) - np.asarray(ref - logp) - 1
  m = np.asarray(mask, np.float64)
  a = np.asarray(adv)[:, None]
  assert float(loss_fn(logp)) == pytest.approx(((-a + 0.1 * k3) * m).sum() / m.sum(), rel=1e-5)
  grad = np.asarray(jax.grad(loss_fn)(logp))
  want = (-np.asarray(adv)[:, None] + 0.1 * (1 - np.exp(np.asarray(ref - logp)))) * m / m.sum()
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_entropy_of_uniform_and_peaked_distributions():
  logits = jnp.asarray([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
  mask = jnp.asarray([[1, 0]])
  assert float(grpo.token_entropy(logits, mask)) == pytest.approx(math.log(4))
  assert float(grpo.token_entropy(logits, jnp.asarray([[0, 1]]))) == pytest.approx(0.0, abs=1e-6)


def test_bad_config_fields_are_named():
  with pytest.raises(ValueError, match="^loss_aggregation: unknown 'mean'"):
    grpo.GRPOConfig(loss_aggregation="mean")
  with pytest.raises(ValueError, match="^kl_estimator: unknown 'k1'"):
    grpo.GRPOConfig(kl_estimator="k1")
  with pytest.raises(ValueError, match="^group_size: "):
    grpo.GRPOConfig(group_size=1)


def test_policy_update_raises_the_probability_of_positive_advantage_completions():
  """Two completions of one prompt, advantages +1 and -1: after a few updates the first is more
  likely and the second less, and the loss's log-probs are the generator's recomputed ones."""
  import optax
  from flax.linen import meta

  from r1jax import ModelConfig
  from r1jax.model import Transformer
  from r1jax.train.step import TrainState

  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
  model = Transformer(cfg)
  tokens = jnp.asarray([[10, 11, 12, 20, 21, 3], [10, 11, 12, 30, 31, 3]], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
  segments = jnp.ones((2, 6), jnp.int32)
  variables = meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  optimizer = optax.adam(1e-3)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    router_bias=variables["router_bias"],
    opt_state=optimizer.init(variables["params"]),
  )
  mask = jnp.asarray([[0, 0, 1, 1, 1]] * 2)  # targets 20 21 EOS / 30 31 EOS
  temperature = 0.7
  forward = jax.jit(model.apply)
  logprobs = jax.jit(
    lambda v: grpo.completion_logprobs(model, v, tokens, positions, segments, temperature)
  )

  def logp_of(state):
    v = {"params": state.params, "router_bias": state.router_bias}
    got = logprobs(v)
    # Independent: numpy's tempered log-softmax of the plain forward's logits, gathered.
    logits = np.asarray(forward(v, tokens, positions, segments), np.float64)[:, :-1]
    z = logits / temperature
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    return np.asarray((got * mask).sum(axis=-1))

  before = logp_of(state)
  cfg_grpo = grpo.GRPOConfig(group_size=2, beta=0.0)
  update = grpo.make_policy_update(model, optimizer, cfg_grpo, temperature)
  batch = {
    "tokens": tokens,
    "positions": positions,
    "segment_ids": segments,
    "mask": mask,
    "advantages": jnp.asarray([1.0, -1.0]),
    "ref_logp": jnp.zeros((2, 5)),
  }
  for _ in range(3):
    v = {"params": state.params, "router_bias": state.router_bias}
    batch["old_logp"] = logprobs(v)
    state, metrics = update(state, batch)
  after = logp_of(state)
  assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1, (before, after)
  assert int(state.step) == 3 and np.isfinite(float(metrics["grad_norm"]))
