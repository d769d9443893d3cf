"""MLA: naive forward vs a float64 numpy re-derivation; absorbed decode vs the naive forward."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig, Transformer
from r1jax.layers.mla import MLA
from r1jax.layers.rope import inverse_frequencies, softmax_scale
from tests.references import np_mla

CONFIGS = {
  "q_lora": ModelConfig.from_preset("tiny"),
  "no_q_lora": ModelConfig.from_preset("tiny", q_lora_rank=0, rope_type="default"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_naive_mla_matches_numpy(name):
  cfg = CONFIGS[name]
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mla = MLA(cfg)
  params = flax.linen.meta.unbox(jax.jit(mla.init)(jax.random.key(1), x, positions))
  out = jax.jit(mla.apply)(params, x, positions)
  flat = dict(params["params"])
  flat["kv_norm_scale"] = flat.pop("kv_norm")["scale"]
  if cfg.q_lora_rank:
    flat["q_norm_scale"] = flat.pop("q_norm")["scale"]
  want = np_mla(flat, x, np.asarray(positions), cfg, inverse_frequencies(cfg), softmax_scale(cfg))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _decode_token_by_token(cfg, variables, tokens, chunks):
  decoder = Transformer(cfg, decode=True)
  cache = jax.jit(decoder.init)(jax.random.key(0), tokens)["cache"]
  params = {k: v for k, v in variables.items() if k in ("params", "router_bias")}
  step = jax.jit(lambda c, t: decoder.apply({**params, "cache": c}, t, mutable=["cache"]))
  outputs, start = [], 0
  for size in chunks:
    logits, updated = step(cache, tokens[:, start : start + size])
    cache, start = updated["cache"], start + size
    outputs.append(logits)
  return jnp.concatenate(outputs, axis=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absorbed_decode_equals_naive_forward(name):
  """Token by token through the latent cache, and with a multi-token prefill chunk."""
  cfg = CONFIGS[name]
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, cfg.vocab_size)
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.key(3), tokens)
  full = jax.jit(model.apply)(variables, tokens)
  scale = float(jnp.abs(full).max())
  for chunks in ([1] * 8, [4, 1, 1, 1, 1]):
    decoded = _decode_token_by_token(cfg, variables, tokens, chunks)
    assert float(jnp.abs(decoded - full).max()) / scale < 1e-5, chunks


def test_cache_holds_only_the_latent_and_the_rope_key():
  cfg = CONFIGS["q_lora"]
  tokens = jnp.zeros((3, 7), jnp.int32)
  init = jax.jit(Transformer(cfg, decode=True).init)
  cache = jax.eval_shape(init, jax.random.key(0), tokens)["cache"]
  attn = cache["moe_layers"]["attn"]
  assert attn["latent"].shape == (cfg.num_moe_layers, 3, 7, cfg.kv_lora_rank)
  assert attn["rope_key"].shape == (cfg.num_moe_layers, 3, 7, cfg.qk_rope_head_dim)


def _plain_attention(q, k, v, mask):
  """The definition, independent of `attend`: a float32 masked softmax over every key."""
  scores = jnp.einsum("bhsd,bhtd->bhst", q, k)
  scores = jnp.where(mask[:, None], scores, -1e30)
  return jnp.einsum("bhst,bhte->bhse", jax.nn.softmax(scores, axis=-1), v)


def _masks(b, s):
  """Name -> (mask [b, s, s], whether `attend` may skip blocks for it)."""
  rng = np.random.RandomState(0)
  arange = np.broadcast_to(np.arange(s), (b, s))
  # Packed rows: documents of random lengths, positions restarting at each one.
  cuts = [np.sort(rng.choice(np.arange(1, s), 4, replace=False)) for _ in range(b)]
  segments = np.stack([np.searchsorted(c, np.arange(s), side="right") + 1 for c in cuts])
  packed_pos = np.stack(
    [np.arange(s) - np.r_[0, c][seg - 1] for c, seg in zip(cuts, segments, strict=True)]
  )
  shuffled = np.stack([rng.permutation(s) for _ in range(b)])  # arbitrary positions
  offset = arange + np.array([[0], [3], [7]])[:b]
  from r1jax.layers.mla import attention_mask

  def mask(pos, seg=None):
    pos, seg = jnp.asarray(pos), None if seg is None else jnp.asarray(seg)
    return attention_mask(pos, pos, seg, seg)

  fully_masked = np.array(mask(arange))
  fully_masked[:, 5, :] = False  # a row that sees nothing: uniform over every key
  return {
    "causal": (mask(arange), True),
    "packed": (mask(packed_pos, segments), True),
    "offset_positions": (mask(offset), True),
    "shuffled_positions": (mask(shuffled), False),
    "packed_shuffled": (mask(shuffled, segments), False),
    "fully_masked_row": (jnp.asarray(fully_masked), False),
  }


@pytest.mark.parametrize("name", sorted(_masks(3, 8)))
@pytest.mark.parametrize("s", [300, 8])
def test_attend_matches_plain_softmax_forward_and_grads(name, s):
  """The blocked (causal) and general paths of `attend` against the plain masked softmax,
  value and gradients, on random inputs; s=300 spans 3 query blocks (a ragged last one)."""
  from r1jax.layers import mla

  b, h, d, e = 3, 2, 16, 8
  mask, lower = _masks(b, s)[name]
  assert bool(mla._lower_triangular(mask)) == lower
  if s > mla.ATTEND_BLOCK:
    assert len(mla._spans(s, s, mla.ATTEND_BLOCK)) == 3
  ks = jax.random.split(jax.random.key(s), 4)
  q, k = (jax.random.normal(key, (b, h, s, d)) for key in ks[:2])
  v = jax.random.normal(ks[2], (b, h, s, e))
  cot = jax.random.normal(ks[3], (b, h, s, e))
  for attention in (mla.attend, _plain_attention):
    out, vjp = jax.vjp(lambda q, k, v, f=attention: f(q, k, v, mask), q, k, v)
    if attention is mla.attend:
      got = (out, *vjp(cot))
    else:
      want = (out, *vjp(cot))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
