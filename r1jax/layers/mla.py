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

Decode cache ("cache" collection, per layer; `ModelConfig.decode_cache` picks the form):
  absorbed  latent [b, T, c], rope_key [b, T, r]; scores `bshc,btc->bsht` + `bshr,btr->bsht`
  naive     key [b, h, T, d+r], value [b, h, T, d_v]: DeepSeek's attn_impl="naive" cache, heads
            leading; scores `bshd,bhtd->bsht`
  both      index (int32 scalar: slots written so far, shared by the batch), valid [b, T]
            (slots holding real tokens: a left-padded prompt's padding is never attended to).
  local     a layer with attention window W (`ModelConfig.attention_windows`) keeps T = min(W,
            max length) slots as a ring (`MLA._decode_ring`): its cache never outgrows W tokens.
The naive cache's heads lead, as in `MLA._naive`, because XLA:CPU (jax 0.10.2) runs a batched
dot only with its batch dims leading: with DeepSeek's [b, T, h, d] it copied the whole key and
value caches into [b, h, T, d] on every decode step (on `small` at 4 x 4096 tokens, 88 ms against
6 ms for the attention core alone).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.cpu_kernels.latent_attention import latent_attention
from r1jax.cpu_kernels.small_matmul import small_matmul
from r1jax.layers.common import NEG_INF, dtype_of, kernel_param, masked_softmax
from r1jax.layers.norm import RMSNorm
from r1jax.layers.rope import apply_rope, softmax_scale


def attention_mask(
  q_positions, k_positions, q_segments=None, k_segments=None, k_valid=None, window: int = 0
):
  """Boolean [b, s, t]: causal by position, within the same segment, keys that exist, and with
  a window W > 0 only the W most recent positions (the query's own included)."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]
  if window:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < window
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  if k_valid is not None:
    mask &= k_valid[:, None, :]
  return mask


# ------------------------------------------------------------------ naive attention core
#
# Measured on the `small` preset (2-core CPU, b=4, s=512, h=8): the [b, h, s, t] score tensors
# make this core memory-bound (the products have K = 96 or 64), so the work that counts is the
# number of score elements written and read. A causal mask leaves the upper triangle of scores
# unused; `attend` skips it in static query blocks of ATTEND_BLOCK rows (query block i against
# keys [0, end of block i) only: (n+1)/2n of the scores for n blocks). Forward and backward of
# the core: 0.30 s -> 0.17 s per layer (the single [b, h, s, t] einsum form it replaced).

ATTEND_BLOCK = 128  # query rows per block; measured faster than 64 and 256 at s=512


def _bias(mask):
  return jnp.where(mask, 0.0, NEG_INF)[:, None]  # [b, 1, s, t] float32


def _spans(s: int, t: int, block: int | None):
  """(query start, query end, keys used) per query block; None: one block, every key."""
  if block is None or s != t or s <= block:
    return ((0, s, t),)
  return tuple((a, min(a + block, s), min(a + block, s)) for a in range(0, s, block))


def _lower_triangular(mask):
  """Whether no query sees a later key (mask[b, s, t] False for t > s) and every query sees
  itself: then the blocks' skipped keys would all be masked, and no row is fully masked (whose
  softmax is uniform over every key), so the blocked core is exact."""
  s, t = mask.shape[1:]
  if s != t:
    return jnp.array(False)
  later = jnp.arange(s)[:, None] < jnp.arange(t)[None, :]
  diagonal = jnp.diagonal(mask, axis1=1, axis2=2)
  return ~jnp.any(mask & later) & jnp.all(diagonal)


def _attend_fwd_blocks(q, k, v, mask, spans):
  """Per query block: out = exp(scores - m) @ v / total (the normalisation after the value product,
  fewer divides); m and total (the row max and sum) and the blocks' exp(scores - m) are kept for
  the backward."""
  outs, maxes, sums, probs = [], [], [], []
  for a, e, keys in spans:
    scores = jnp.einsum(
      "bhsd,bhtd->bhst", q[:, :, a:e], k[:, :, :keys], preferred_element_type=jnp.float32
    )
    scores += _bias(mask[:, a:e, :keys])
    m = scores.max(axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    total = p.sum(axis=-1, keepdims=True)
    out = jnp.einsum(
      "bhst,bhte->bhse", p.astype(v.dtype), v[:, :, :keys], preferred_element_type=jnp.float32
    )
    outs.append(out / total)
    maxes.append(m)
    sums.append(total)
    probs.append(p)
  cat = lambda xs: jnp.concatenate(xs, axis=2) if len(xs) > 1 else xs[0]
  return cat(outs).astype(v.dtype), cat(maxes), cat(sums), tuple(probs)


def _attend_bwd_blocks(q, k, v, mask, out, m, total, probs, dout, spans):
  """Softmax attention's VJP per query block, from the forward's exp(scores - m) (probs) or,
  with probs None, recomputing them from m: with p = exp(scores - m) / total,
  dv = p^T do, dp = do v^T, ds = p (dp - rowsum(do * out)), dq = ds k, dk = ds^T q."""
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for i, (a, e, keys) in enumerate(spans):
    qi, ki, vi, doi = q[:, :, a:e], k[:, :, :keys], v[:, :, :keys], dout[:, :, a:e]
    if probs is None:
      scores = f32("bhsd,bhtd->bhst", qi, ki) + _bias(mask[:, a:e, :keys])
      p = jnp.exp(scores - m[:, :, a:e]) / total[:, :, a:e]
    else:
      p = probs[i] / total[:, :, a:e]
    dp = f32("bhse,bhte->bhst", doi, vi)
    # Zero at masked keys: p is zero there anyway, except in a fully masked row, whose uniform
    # output does not depend on its scores at all (autodiff of the additive bias would say it
    # does).
    ds = jnp.where(mask[:, None, a:e, :keys], p * (dp - delta[:, :, a:e]), 0).astype(q.dtype)
    dq.append(f32("bhst,bhtd->bhsd", ds, ki))
    pad = ((0, 0), (0, 0), (0, k.shape[2] - keys), (0, 0))
    dk += jnp.pad(f32("bhst,bhsd->bhtd", ds, qi), pad)
    dv += jnp.pad(f32("bhst,bhse->bhte", p.astype(v.dtype), doi), pad)
  dq = jnp.concatenate(dq, axis=2) if len(dq) > 1 else dq[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@jax.custom_vjp
def attend(q, k, v, mask):
  """Masked softmax attention: q [b, h, s, d] (scaled), k [b, h, t, d], v [b, h, t, e], mask
  bool [b, s, t] -> [b, h, s, e] in v.dtype; scores and softmax in float32.

  Exact for any mask: a fully masked row is uniform over all t keys (the finite NEG_INF).
  When the mask is lower triangular with a true diagonal (causal, packed or not, checked at run
  time: positions are traced) query blocks skip the keys after them; otherwise one block sees
  every key. A custom VJP, so that the run-time choice (lax.cond) keeps one set of residuals
  (under autodiff a cond stores both branches' residuals, zero-filling the branch not taken):
  q, k, v, the output, the softmax's row max and sum, and the blocked branch's exp(scores - m)
  blocks (the general branch recomputes its probabilities in the backward; measured on the
  `small` shapes, storing the blocks made the core's forward+backward ~10% faster than
  recomputing them).
  """
  return _attend_fwd(q, k, v, mask)[0]


def _attend_fwd(q, k, v, mask):
  s, t = q.shape[2], k.shape[2]
  tri = _lower_triangular(mask)
  blocked, general = _spans(s, t, ATTEND_BLOCK), _spans(s, t, None)
  if blocked == general:
    out, m, total, probs = _attend_fwd_blocks(q, k, v, mask, general)
    return out, (q, k, v, mask, out, m, total, probs, tri)

  def general_fwd(*args):
    # Same outputs as the blocked branch: its probability blocks as zeros (the general
    # backward recomputes its probabilities instead).
    out, m, total, _ = _attend_fwd_blocks(*args, general)
    zeros = tuple(jnp.zeros((*q.shape[:2], e - a, keys), jnp.float32) for a, e, keys in blocked)
    return out, m, total, zeros

  blocked_fwd = functools.partial(_attend_fwd_blocks, spans=blocked)
  out, m, total, probs = jax.lax.cond(tri, blocked_fwd, general_fwd, q, k, v, mask)
  return out, (q, k, v, mask, out, m, total, probs, tri)


def _attend_bwd(res, dout):
  q, k, v, mask, out, m, total, probs, tri = res
  s, t = q.shape[2], k.shape[2]
  blocked, general = _spans(s, t, ATTEND_BLOCK), _spans(s, t, None)
  if blocked == general:
    dq, dk, dv = _attend_bwd_blocks(q, k, v, mask, out, m, total, probs, dout, general)
    return dq, dk, dv, None
  blocked_bwd = functools.partial(_attend_bwd_blocks, spans=blocked)
  general_bwd = lambda q, k, v, mask, out, m, total, probs, dout: _attend_bwd_blocks(
    q, k, v, mask, out, m, total, None, dout, general
  )
  args = (q, k, v, mask, out, m, total, probs, dout)
  dq, dk, dv = jax.lax.cond(tri, blocked_bwd, general_bwd, *args)
  return dq, dk, dv, None


attend.defvjp(_attend_fwd, _attend_bwd)


class MLA(nn.Module):
  """Multi-head Latent Attention with a KV cache for decoding.

  Call with `decode=False` for training and prefill (naive form, no cache) or `decode=True` to
  read and extend the "cache" collection in the form `cfg.decode_cache` picks: the absorbed
  latent cache (the default) or the naive expanded one (the module docstring lists both). The
  cache is sized by the sequence length of the `init` call made with `decode=True`.

  window W > 0 (`ModelConfig.attention_windows`): local attention, each query seeing its W most
  recent tokens, in every form; the decode cache is then a ring of min(W, length) slots.
  """

  cfg: ModelConfig
  decode: bool = False
  window: int = 0

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
      cq = small_matmul("bsm,mq->bsq", x, w["wq_a"], cfg.cpu_kernels)
      cq = RMSNorm(cfg.rms_norm_eps, "q_lora", cfg.param_dtype, name="q_norm")(cq)
      q = small_matmul("bsq,qhd->bshd", cq, w["wq_b"], cfg.cpu_kernels)
    else:
      q = small_matmul("bsm,mhd->bshd", x, w["wq"], cfg.cpu_kernels)
    nope = cfg.qk_nope_head_dim
    return q[..., :nope], apply_rope(q[..., nope:], positions, cfg)

  def latent(self, w, x, positions):
    """x [b, s, m] -> (normalised latent [b, s, c], roped shared key [b, s, r])."""
    cfg = self.cfg
    kv = small_matmul("bsm,mc->bsc", x, w["wkv_a"], cfg.cpu_kernels)
    c = cfg.kv_lora_rank
    latent = RMSNorm(cfg.rms_norm_eps, "kv_lora", cfg.param_dtype, name="kv_norm")(kv[..., :c])
    return latent, apply_rope(kv[..., c:], positions, cfg)

  @nn.compact
  def __call__(self, x, positions, segment_ids=None):
    """x [b, s, m], positions int [b, s], segment_ids int [b, s] or None -> [b, s, m]."""
    w = self._weights()
    q_nope, q_pe = self.queries(w, x, positions)
    latent, k_pe = self.latent(w, x, positions)
    if self.decode and self.has_variable("cache", "index"):
      if self.window:
        return self._decode_ring(w, q_nope, q_pe, latent, k_pe, segment_ids)
      return self._decode(w, q_nope, q_pe, latent, k_pe, segment_ids)
    if self.decode:  # The init call that creates the cache.
      self._cache_variables(latent.shape[:2], latent.dtype)
    mask = attention_mask(positions, positions, segment_ids, segment_ids, window=self.window)
    return self._naive(w, q_nope, q_pe, latent, k_pe, mask)

  def _naive(self, w, q_nope, q_pe, latent, k_pe, mask):
    """Expanded per-head keys and values: the training and prefill form.

    As in DeepSeek's naive path, q = [q_nope ; q_pe] and k = [k_nope ; k_pe] (k_pe shared by the
    heads) give the scores in one product (`attend`); the scale goes on q, as flax's
    dot_product_attention does. Heads lead ([b, h, s, d]) so that the score products batch
    over (b, h) without transposes.
    """
    nope = self.cfg.qk_nope_head_dim
    kv = jnp.einsum("btc,chd->bhtd", latent, w["wkv_b"])
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k_pe = jnp.broadcast_to(k_pe[:, None], k_nope.shape[:-1] + k_pe.shape[-1:])
    q = jnp.concatenate([q_nope, q_pe], axis=-1) * softmax_scale(self.cfg)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    out = attend(q.transpose(0, 2, 1, 3), k, v, mask)
    return jnp.einsum("bhsd,hdm->bsm", out, w["wo"])

  def _absorbed(self, w, q_nope, q_pe, latent, k_pe, mask):
    """W^UK folded into the query, W^UV into the output: attention over the latent itself."""
    # `bshd,chd->bshc`, scores `bshc,btc->bsht` + `bshr,btr->bsht`, masked softmax,
    # `bsht,btc->bshc`, `bshc,chd->bshd`: one fused C++ kernel for decode steps on XLA:CPU
    # (r1jax.cpu_kernels.latent_attention)
    out = latent_attention(
      q_nope, q_pe, latent, k_pe, mask, w["wkv_b"], softmax_scale(self.cfg), self.cfg.cpu_kernels
    )
    return small_matmul("bshd,hdm->bsm", out, w["wo"], self.cfg.cpu_kernels, n_in=2)

  def _naive_cached(self, w, q_nope, q_pe, keys, values, mask):
    """DeepSeek's naive decode over the cached per-head keys [b, h, t, d+r] and values
    [b, h, t, d_v]; the scale goes on the scores, as in `_absorbed`."""
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    scores = jnp.einsum("bshd,bhtd->bsht", q, keys)
    probs = masked_softmax(scores * softmax_scale(self.cfg), mask).astype(values.dtype)
    out = jnp.einsum("bsht,bhtd->bshd", probs, values)
    return small_matmul("bshd,hdm->bsm", out, w["wo"], self.cfg.cpu_kernels, n_in=2)

  def _expand(self, w, latent, k_pe):
    """latent [b, t, c], roped k_pe [b, t, r] -> keys [b, h, t, d+r], values [b, h, t, d_v]."""
    nope = self.cfg.qk_nope_head_dim
    kv = jnp.einsum("btc,chd->bhtd", latent, w["wkv_b"])
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k_pe = jnp.broadcast_to(k_pe[:, None], k_nope.shape[:-1] + k_pe.shape[-1:])
    return jnp.concatenate([k_nope, k_pe], axis=-1), v

  def _cache_variables(self, batch_length, dtype):
    """The form's two cached arrays (absorbed: latent, rope_key; naive: key, value), the write
    index and the slot validity, created zero-filled on first use."""
    b, length = batch_length
    if self.window:  # local attention: a ring of the W most recent slots
      length = min(length, self.window)
    cfg = self.cfg
    if cfg.decode_cache == "naive":
      h = cfg.num_attention_heads
      shapes = {"key": (b, h, length, cfg.qk_head_dim), "value": (b, h, length, cfg.v_head_dim)}
    else:
      shapes = {
        "latent": (b, length, cfg.kv_lora_rank),
        "rope_key": (b, length, cfg.qk_rope_head_dim),
      }
    first, second = (
      self.variable("cache", name, jnp.zeros, shape, dtype) for name, shape in shapes.items()
    )
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    # Which slots hold real tokens: a left-padded prompt's padding is written but never read.
    valid = self.variable("cache", "valid", jnp.zeros, (b, length), jnp.bool_)
    return first, second, index, valid

  def _decode(self, w, q_nope, q_pe, latent, k_pe, segment_ids=None):
    """Appends s new tokens at the cache index and attends over everything cached so far.

    The new tokens' RoPE positions came with the queries (normally index + arange(s); a
    left-padded row counts from its first real token); the cache slot is the index, shared by
    the batch. segment_ids [b, s]: 0 marks padding, whose slots no later query attends to
    (None: all real). The naive form expands the new tokens' keys and values once, here, and
    caches them; the absorbed form caches the latent and folds the weights into q and the output.
    """
    first, second, index, valid = self._cache_variables(latent.shape[:2], latent.dtype)
    if self.cfg.decode_cache == "naive":
      new_first, new_second = self._expand(w, latent, k_pe)
    else:
      new_first, new_second = latent, k_pe
    start = index.value
    real = jnp.ones(latent.shape[:2], jnp.bool_) if segment_ids is None else segment_ids > 0
    valid.value = jax.lax.dynamic_update_slice_in_dim(valid.value, real, start, axis=1)
    axis = 2 if self.cfg.decode_cache == "naive" else 1  # the slot axis t
    for cached, new_value in ((first, new_first), (second, new_second)):
      cached.value = jax.lax.dynamic_update_slice_in_dim(
        cached.value, new_value.astype(cached.value.dtype), start, axis=axis
      )
    new = latent.shape[1]
    index.value = start + new
    b, length = valid.value.shape
    slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    query_slots = start + jnp.broadcast_to(jnp.arange(new, dtype=jnp.int32), (b, new))
    mask = attention_mask(query_slots, slots, k_valid=(slots < index.value) & valid.value)
    if self.cfg.decode_cache == "naive":
      return self._naive_cached(w, q_nope, q_pe, first.value, second.value, mask)
    return self._absorbed(w, q_nope, q_pe, first.value, second.value, mask)

  def _decode_ring(self, w, q_nope, q_pe, latent, k_pe, segment_ids=None):
    """`_decode` for local attention: the cache is a ring of L = min(W, length) slots, slot a of
    the sequence in ring entry a mod L, so it holds the last L slots written.

    The s new tokens attend over the ring as it was plus themselves (a chunk longer than L needs
    its own early tokens, and a short one the ring's oldest entries, which writing first would
    overwrite); the mask keeps, per query slot q, keys a with q - W < a <= q. Then the last
    min(s, L) new tokens are written into the ring.
    """
    first, second, index, valid = self._cache_variables(latent.shape[:2], latent.dtype)
    naive = self.cfg.decode_cache == "naive"
    new_first, new_second = self._expand(w, latent, k_pe) if naive else (latent, k_pe)
    b, new = latent.shape[:2]
    length = valid.value.shape[1]
    start = index.value
    # The sequence slot each ring entry holds: the last one before `start` congruent to it
    # (negative: never written).
    entry = jnp.arange(length, dtype=jnp.int32)
    held = start - 1 - jnp.mod(start - 1 - entry, length)
    new_slots = start + jnp.arange(new, dtype=jnp.int32)
    real = jnp.ones((b, new), jnp.bool_) if segment_ids is None else segment_ids > 0
    axis = 2 if naive else 1  # the slot axis
    dtype = first.value.dtype
    keys = [
      jnp.concatenate([cached.value, fresh.astype(dtype)], axis=axis)
      for cached, fresh in ((first, new_first), (second, new_second))
    ]
    key_slots = jnp.broadcast_to(jnp.concatenate([held, new_slots]), (b, length + new))
    key_valid = jnp.concatenate([valid.value & (held >= 0)[None], real], axis=1)
    query_slots = jnp.broadcast_to(new_slots, (b, new))
    mask = attention_mask(query_slots, key_slots, k_valid=key_valid, window=self.window)
    kept = min(new, length)
    entries = jnp.mod(start + new - kept + jnp.arange(kept, dtype=jnp.int32), length)
    for cached, fresh in ((first, new_first), (second, new_second)):
      tail = jax.lax.slice_in_dim(fresh.astype(dtype), new - kept, new, axis=axis)
      at = (slice(None), slice(None), entries) if naive else (slice(None), entries)
      cached.value = cached.value.at[at].set(tail)
    valid.value = valid.value.at[:, entries].set(real[:, new - kept :])
    index.value = start + new
    if naive:
      return self._naive_cached(w, q_nope, q_pe, keys[0], keys[1], mask)
    return self._absorbed(w, q_nope, q_pe, keys[0], keys[1], mask)
