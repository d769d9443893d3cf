"""The whole Transformer: causality, MTP wiring, scan == unrolled, trainability."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig, Transformer
from r1jax.train.losses import mtp_loss, next_token_loss
from tests.one_batch import train_on_one_batch

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def tiny_variables():
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY.vocab_size)
  return tokens, jax.jit(Transformer(TINY).init)(jax.random.key(1), tokens)


def _apply(cfg, variables, tokens, **kwargs):
  return jax.jit(lambda v, t: Transformer(cfg).apply(v, t, **kwargs))(variables, tokens)


def test_public_api_shapes(tiny_variables):
  tokens, variables = tiny_variables
  logits = _apply(TINY, variables, tokens)
  assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == jnp.float32
  main, mtp = _apply(TINY, variables, tokens, mtp=True)
  np.testing.assert_array_equal(main, logits)
  assert mtp.shape == (TINY.num_nextn_predict_layers, 2, 16, TINY.vocab_size)


@pytest.mark.parametrize("t", [0, 5, 14])
def test_causality(tiny_variables, t):
  """Changing tokens after position t never changes logits (main or MTP) at or before t - depth."""
  tokens, variables = tiny_variables
  changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] * 7 + 3) % TINY.vocab_size)
  a, a_mtp = _apply(TINY, variables, tokens, mtp=True)
  b, b_mtp = _apply(TINY, variables, changed, mtp=True)
  np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
  assert float(jnp.abs(a[:, t + 1 :] - b[:, t + 1 :]).max()) > 1e-4  # the change is visible
  # MTP depth k at position i reads token i + k, so positions <= t - k are untouched.
  depth = TINY.num_nextn_predict_layers
  np.testing.assert_array_equal(a_mtp[:, :, : t + 1 - depth], b_mtp[:, :, : t + 1 - depth])


def test_mtp_concatenates_embedding_first_and_uses_the_shared_head(tiny_variables):
  """Recompute the MTP depth by hand from its parts (SPEC 6.1-6.3) and compare."""
  from r1jax.layers.block import DecoderBlock
  from r1jax.layers.norm import rms_norm

  tokens, variables = tiny_variables
  _, mtp = _apply(TINY, variables, tokens, mtp=True)
  p = flax.linen.meta.unbox(variables["params"])
  h = _apply(TINY, variables, tokens, method=Transformer.hidden)
  nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((2, 1), tokens.dtype)], 1)
  q = p["mtp_0"]
  eps = TINY.rms_norm_eps
  joined = jnp.concatenate(
    [rms_norm(p["embed"][nxt], q["enorm"]["scale"], eps), rms_norm(h, q["hnorm"]["scale"], eps)], -1
  )
  block_vars = {"params": q["block"], "router_bias": variables["router_bias"]["mtp_0"]["block"]}
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  out, _ = jax.jit(DecoderBlock(TINY, True).apply)(block_vars, joined @ q["eh_proj"], pos)
  want = rms_norm(out, q["shared_head_norm"]["scale"], eps) @ p["lm_head"]
  np.testing.assert_allclose(mtp[0], want, rtol=1e-5, atol=1e-5)


def test_scanned_and_unrolled_stacks_agree(tiny_variables):
  tokens, variables = tiny_variables
  unrolled = dataclasses.replace(TINY, scan_layers=False)
  params = flax.linen.meta.unbox(variables["params"])
  moe = params["moe_layers"]
  layered = {
    f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], moe) for i in range(TINY.num_moe_layers)
  }
  dense = {"layer_0": jax.tree.map(lambda x: x[0], params["dense_layers"])}
  bias = variables["router_bias"]["moe_layers"]
  layered_bias = {
    f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], bias) for i in range(TINY.num_moe_layers)
  }
  new = {
    "params": {**params, "moe_layers": layered, "dense_layers": dense},
    "router_bias": {**variables["router_bias"], "moe_layers": layered_bias},
  }
  np.testing.assert_allclose(
    _apply(unrolled, new, tokens), _apply(TINY, variables, tokens), rtol=1e-6, atol=1e-6
  )


def test_bfloat16_compute_stays_close_to_float32(tiny_variables):
  """bf16 matmuls (float32 norms, softmax, router, logits) track the float32 model.

  A near-tied router score can flip one token's expert choice in bf16, so the check is on the
  typical (median) error, with the maximum allowed to be larger.
  """
  tokens, variables = tiny_variables
  low = _apply(dataclasses.replace(TINY, dtype="bfloat16"), variables, tokens)
  high = _apply(TINY, variables, tokens)
  assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
  err = jnp.abs(low - high)
  assert float(jnp.median(err)) < 0.02 * float(jnp.median(jnp.abs(high)))
  assert float(err.max()) < 0.25 * float(jnp.abs(high).max())


def test_losses_shift_targets():
  # Probabilities 0.97 on the intended class, 0.01 on the 4 others (softmax renormalises by 1.01).
  expected = -np.log(0.97 / 1.01)
  logits = jnp.log(jax.nn.one_hot(jnp.array([[1, 2, 3, 0]]), 5) * 0.96 + 0.01)
  tokens = jnp.array([[0, 1, 2, 3]])
  assert float(next_token_loss(logits, tokens)) == pytest.approx(expected, rel=1e-5)
  # Depth 1 at position i predicts token i + 2: logits predicting 2, 3 at positions 0, 1.
  mtp = jnp.log(jax.nn.one_hot(jnp.array([[[2, 3, 0, 0]]]), 5) * 0.96 + 0.01)
  assert float(mtp_loss(mtp, tokens)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # end to end; CI's fast suite must stay well inside its time
def test_tiny_model_overfits_one_batch_with_mtp():
  """Loss (LM + 0.3 MTP + balance) falls by > 90% within 300 steps on one fixed batch."""
  model = Transformer(TINY)
  tokens = jax.random.randint(jax.random.key(3), (8, 32), 0, TINY.vocab_size)
  _, losses, metrics = train_on_one_batch(model, tokens, 300)
  assert metrics["mtp_loss"] < 0.1 * losses[0]
  assert min(losses[-20:]) < 0.1 * losses[0], (losses[0], losses[-20:])
