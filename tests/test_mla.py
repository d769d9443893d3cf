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
