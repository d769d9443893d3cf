"""r1jax.train.losses against numpy loops: target weights of packed rows, chunked cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig
from r1jax.model import Transformer
from r1jax.train import losses


def _numpy_loss(logits, tokens, mask, segment_ids, k):
  """Mean over the positions i whose target i + k is counted and in the same document."""
  b, s, _ = logits.shape
  total = count = 0.0
  for r in range(b):
    for i in range(s - k):
      same = segment_ids is None or (segment_ids[r, i] == segment_ids[r, i + k] > 0)
      if mask[r, i + k] and same:
        row = logits[r, i].astype(np.float64)
        logz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        total += logz - row[tokens[r, i + k]]
        count += 1
  return total / max(count, 1)


@pytest.fixture
def packed():
  rng = np.random.default_rng(0)
  b, s, v = 3, 11, 7
  segment_ids = np.array(
    [[1] * 4 + [2] * 5 + [0] * 2, [1] * 11, [1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 0]], np.int32
  )
  mask = (segment_ids > 0).astype(np.int32)
  mask[1, :5] = 0  # An SFT prompt: its tokens are not targets.
  tokens = rng.integers(0, v, (b, s)).astype(np.int32)
  logits = rng.normal(size=(b, s, v)).astype(np.float32)
  return logits, tokens, mask, segment_ids


def test_next_token_and_mtp_loss_count_only_targets_of_the_same_document(packed):
  logits, tokens, mask, seg = packed
  got = losses.next_token_loss(jnp.asarray(logits), tokens, mask, seg)
  assert float(got) == pytest.approx(_numpy_loss(logits, tokens, mask, seg, 1), rel=1e-5)
  mtp = np.stack([logits, logits[:, ::-1]])
  want = (_numpy_loss(mtp[0], tokens, mask, seg, 2) + _numpy_loss(mtp[1], tokens, mask, seg, 3)) / 2
  assert float(losses.mtp_loss(jnp.asarray(mtp), tokens, mask, seg)) == pytest.approx(
    want, rel=1e-5
  )


def test_without_segments_a_row_is_one_document(packed):
  logits, tokens, mask, _ = packed
  got = losses.next_token_loss(jnp.asarray(logits), tokens, mask)
  assert float(got) == pytest.approx(_numpy_loss(logits, tokens, mask, None, 1), rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
def test_chunked_cross_entropy_equals_full_logits_in_value_and_gradients(packed, chunk):
  _, tokens, mask, seg = packed
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=tokens.shape + (6,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 7)), jnp.float32)
  weights = losses.target_weights(jnp.asarray(mask), 1, jnp.asarray(seg))

  def loss(h, w, c):
    return losses.head_cross_entropy(h, w, tokens, weights, c)

  full, grads_full = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 0)
  chunked, grads = jax.value_and_grad(loss, argnums=(0, 1))(h, w, chunk)
  assert float(chunked) == pytest.approx(float(full), rel=1e-6)
  for a, b in zip(grads, grads_full, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_loss_never_holds_the_full_logits():
  b, s, m, v = 2, 64, 8, 1000
  h, w = jnp.zeros((b, s, m)), jnp.zeros((m, v))
  targets, weights = jnp.zeros((b, s), jnp.int32), jnp.ones((b, s))

  def program(chunk):  # forward and backward, nested jaxprs included
    grad = jax.grad(lambda h, w: losses.head_cross_entropy(h, w, targets, weights, chunk), (0, 1))
    return str(jax.make_jaxpr(grad)(h, w))

  assert f"f32[{b},{s},{v}]" in program(0)
  chunked = program(8)
  assert f"f32[{b},{s},{v}]" not in chunked
  assert f"f32[{b},8,{v}]" in chunked


def test_lm_losses_from_features_equal_the_losses_of_the_model_logits():
  cfg = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=2)
  model = Transformer(cfg)
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  seg = jnp.asarray([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(7)) + list(range(5)), list(range(10)) + [0, 0]], jnp.int32)
  mask = (seg > 0).astype(jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  logits, mtp_logits = jax.jit(lambda v: model.apply(v, tokens, pos, seg, mtp=True))(variables)
  h, mtp_h, head = jax.jit(lambda v: model.apply(v, tokens, pos, seg, method="features"))(variables)
  for chunk in (0, 5):
    lm, mtp = losses.lm_losses(h, mtp_h, head, tokens, mask, seg, chunk)
    assert float(lm) == pytest.approx(
      float(losses.next_token_loss(logits, tokens, mask, seg)), rel=1e-5
    )
    want = losses.mtp_loss(mtp_logits, tokens, mask, seg)
    assert float(mtp) == pytest.approx(float(want), rel=1e-5)


def test_router_z_loss_is_mean_squared_logsumexp_and_weighted_into_the_total():
  from flax.linen import meta

  from r1jax.layers.moe import MoE
  from r1jax.train.step import LossConfig, loss_fn

  cfg = ModelConfig.from_preset("tiny", dtype="float32")
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, cfg.hidden_size)), jnp.float32)
  variables = meta.unbox(MoE(cfg).init(jax.random.key(1), x))
  _, stats = MoE(cfg).apply(variables, x, mutable=["moe_stats"])
  logits = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size) @ np.asarray(
    variables["params"]["gate"], np.float64
  )
  lse = np.log(np.exp(logits).sum(-1))
  assert float(stats["moe_stats"]["router_z"]) == pytest.approx(np.mean(lse**2), rel=1e-5)

  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12)), jnp.int32)
  v = meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  losses_at = jax.jit(
    lambda v, w: loss_fn(
      v["params"], v["router_bias"], model, tokens, None, LossConfig(0.3, 1e-3, 0, w)
    )
  )
  off, (m_off, _) = losses_at(v, 0.0)
  on, (m_on, _) = losses_at(v, 0.5)
  _, all_stats = jax.jit(lambda v: model.apply(v, tokens, mtp=True, mutable=["moe_stats"]))(v)
  z = [leaf.reshape(-1) for p, leaf in traverse(all_stats) if p[-1] == "router_z"]
  assert len(np.concatenate(z)) == cfg.num_moe_layers + cfg.num_nextn_predict_layers
  assert float(m_on["router_z_loss"]) == pytest.approx(float(np.mean(np.concatenate(z))), rel=1e-6)
  assert float(on - off) == pytest.approx(0.5 * float(m_on["router_z_loss"]), rel=1e-5)


def traverse(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree["moe_stats"]).items()
