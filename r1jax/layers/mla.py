"""Multi-head Latent Attention (SPEC.md section 3), naive and absorbed.

Dims, DeepSeek's letters so this reads beside `inference/model.py`:
  b batch, s query position, t key position, h heads, d head dim (nope or v), r rope dim,
  c kv latent (kv_lora_rank), q query latent (q_lora_rank), m model dim (hidden_size).

Weights, stored [in, out] (a torch Linear's weight transposed), per-head axes split out:
  wq_a  [m, q]          c^Q = wq_a x                     (q_lora_rank > 0)
  wq_b  [q, h, d+r]     q = wq_b RMSNorm(c^Q)            per head: nope dims, then rope dims
  wq    [m, h, d+r]     q = wq x                         (q_lora_rank == 0, V2-Lite)
  wkv_a [m, c+r]        [c^KV ; k_pe] = wkv_a x          k_pe: one RoPE key shared by all heads
  wkv_b [c, h, d+d_v]   [k_nope ; v] = wkv_b RMSNorm(c^KV)
  wo    [h, d_v, m]     out = wo o

Naive (training / prefill): expand keys and values per head from the latent.
Absorbed (decode): fold W^UK into the query and W^UV into the output, so the cache holds only the
normalised latent [b, t, c] and the roped shared key [b, t, r]: 576 values per token for V3,
against H * (d + r + d_v) = 40960 for the expanded cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.layers.common import dtype_of, kernel_param
from r1jax.layers.norm import RMSNorm
from r1jax.layers.rope import apply_rope, softmax_scale

_NEG_INF = -1e30  # Finite, so fully masked rows give a uniform softmax instead of NaN.


def attention_mask(q_positions, k_positions, q_segments=None, k_segments=None, k_valid=None):
  """Boolean [b, s, t]: causal by position, within the same segment, keys that exist."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask


def masked_softmax(scores, mask):
  """Softmax over t in float32. scores [b, s, h, t], mask [b, s, t]."""
  scores = jnp.where(mask[:, :, None, :], scores.astype(jnp.float32), _NEG_INF)
  return jax.nn.softmax(scores, axis=-1)


class MLA(nn.Module):
  """Multi-head Latent Attention with a latent KV cache for decoding.

  Call with `decode=False` for training and prefill (naive form, no cache) or `decode=True` to
  read and extend the "cache" collection with the absorbed form. The cache is sized by the
  sequence length of the `init` call made with `decode=True`.
  """

  cfg: ModelConfig
  decode: bool = False

  def _weights(self):
    """Creates (on init) or fetches the projection weights, cast to the compute dtype."""
    cfg = self.cfg
    h, dqk, dv = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    m, c, r = cfg.hidden_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes = {}
    if cfg.q_lora_rank:
      shapes["wq_a"] = (m, cfg.q_lora_rank), ("embed", "q_lora")
      shapes["wq_b"] = (cfg.q_lora_rank, h, dqk), ("q_lora", "heads", "head_dim")
    else:
      shapes["wq"] = (m, h, dqk), ("embed", "heads", "head_dim")
    shapes["wkv_a"] = (m, c + r), ("embed", "kv_lora")
    shapes["wkv_b"] = (c, h, cfg.qk_nope_head_dim + dv), ("kv_lora", "heads", "head_dim")
    shapes["wo"] = (h, dv, m), ("heads", "head_dim", "embed")
    dtype = dtype_of(cfg.dtype)
    return {
      name: kernel_param(self, name, shape, axes, cfg).astype(dtype)
      for name, (shape, axes) in shapes.items()
    }

  def queries(self, w, x, positions):
    """x [b, s, m] -> (q_nope [b, s, h, d], roped q_pe [b, s, h, r])."""
    cfg = self.cfg
    if cfg.q_lora_rank:
      cq = jnp.einsum("bsm,mq->bsq", x, w["wq_a"])
      cq = RMSNorm(cfg.rms_norm_eps, "q_lora", cfg.param_dtype, name="q_norm")(cq)
      q = jnp.einsum("bsq,qhd->bshd", cq, w["wq_b"])
    else:
      q = jnp.einsum("bsm,mhd->bshd", x, w["wq"])
    nope = cfg.qk_nope_head_dim
    return q[..., :nope], apply_rope(q[..., nope:], positions, cfg)

  def latent(self, w, x, positions):
    """x [b, s, m] -> (normalised latent [b, s, c], roped shared key [b, s, r])."""
    cfg = self.cfg
    kv = jnp.einsum("bsm,mc->bsc", x, w["wkv_a"])
    c = cfg.kv_lora_rank
    latent = RMSNorm(cfg.rms_norm_eps, "kv_lora", cfg.param_dtype, name="kv_norm")(kv[..., :c])
    return latent, apply_rope(kv[..., c:], positions, cfg)

  @nn.compact
  def __call__(self, x, positions, segment_ids=None):
    """x [b, s, m], positions int [b, s], segment_ids int [b, s] or None -> [b, s, m]."""
    w = self._weights()
    q_nope, q_pe = self.queries(w, x, positions)
    latent, k_pe = self.latent(w, x, positions)
    if self.decode and self.has_variable("cache", "latent"):
      return self._decode(w, q_nope, q_pe, latent, k_pe)
    if self.decode:  # The init call that creates the cache.
      self._cache_variables(latent.shape[:2], latent.dtype)
    mask = attention_mask(positions, positions, segment_ids, segment_ids)
    return self._naive(w, q_nope, q_pe, latent, k_pe, mask)

  def _naive(self, w, q_nope, q_pe, latent, k_pe, mask):
    """Expanded per-head keys and values: the training and prefill form.

    As in DeepSeek's naive path, q = [q_nope ; q_pe] and k = [k_nope ; k_pe] (k_pe shared by the
    heads) give the scores in one einsum. For speed on CPU (measured on the `small` preset:
    the attention core's forward+backward ~1.7x faster than separate nope/rope einsums and a
    [b, s, h, t] softmax) the scores are laid out [b, h, s, t] (the dot's batch dims first, so
    no transposes), the scale goes on q (as flax's dot_product_attention does), the mask is an
    additive bias, and the softmax is normalised after the value einsum:
    out = (exp(scores - max_t) @ v) / sum_t exp(scores - max_t).
    """
    nope = self.cfg.qk_nope_head_dim
    kv = jnp.einsum("btc,chd->bthd", latent, w["wkv_b"])
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1) * softmax_scale(self.cfg)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32)
    scores += jnp.where(mask, 0.0, _NEG_INF)[:, None]
    # The max only shifts the exponent (softmax is shift-invariant): no gradient through it.
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
    out = jnp.einsum(
      "bhst,bthd->bhsd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    out = (out / unnormalised.sum(axis=-1, keepdims=True)).astype(v.dtype)
    return jnp.einsum("bhsd,hdm->bsm", out, w["wo"])

  def _absorbed(self, w, q_nope, q_pe, latent, k_pe, mask):
    """W^UK folded into the query, W^UV into the output: attention over the latent itself."""
    nope = self.cfg.qk_nope_head_dim
    wkv_b = w["wkv_b"]
    q_latent = jnp.einsum("bshd,chd->bshc", q_nope, wkv_b[..., :nope])
    scores = jnp.einsum("bshc,btc->bsht", q_latent, latent)
    scores += jnp.einsum("bshr,btr->bsht", q_pe, k_pe)
    probs = masked_softmax(scores * softmax_scale(self.cfg), mask).astype(latent.dtype)
    out_latent = jnp.einsum("bsht,btc->bshc", probs, latent)
    out = jnp.einsum("bshc,chd->bshd", out_latent, wkv_b[..., nope:])
    return jnp.einsum("bshd,hdm->bsm", out, w["wo"])

  def _cache_variables(self, batch_length, dtype):
    b, length = batch_length
    cfg = self.cfg
    latent = self.variable("cache", "latent", jnp.zeros, (b, length, cfg.kv_lora_rank), dtype)
    rope_key = self.variable(
      "cache", "rope_key", jnp.zeros, (b, length, cfg.qk_rope_head_dim), dtype
    )
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    return latent, rope_key, index

  def _decode(self, w, q_nope, q_pe, latent, k_pe):
    """Appends s new tokens at the cache index and attends over everything cached so far.

    The new tokens' RoPE positions came with the queries (normally index + arange(s)); the cache
    slot is the index, shared by the batch.
    """
    latent_cache, rope_cache, index = self._cache_variables(latent.shape[:2], latent.dtype)
    start = index.value
    latent_cache.value = jax.lax.dynamic_update_slice_in_dim(
      latent_cache.value, latent.astype(latent_cache.value.dtype), start, axis=1
    )
    rope_cache.value = jax.lax.dynamic_update_slice_in_dim(
      rope_cache.value, k_pe.astype(rope_cache.value.dtype), start, axis=1
    )
    new = latent.shape[1]
    index.value = start + new
    b, length = latent_cache.value.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    query_slots = start + jnp.broadcast_to(jnp.arange(new, dtype=jnp.int32), (b, new))
    mask = attention_mask(query_slots, slots, k_valid=slots < index.value)
    return self._absorbed(w, q_nope, q_pe, latent_cache.value, rope_cache.value, mask)
