"""Language-model losses: next-token cross-entropy and the multi-token-prediction loss.

Dims: b batch, s sequence, m model dim, v vocabulary, n MTP depth.

Which predictions count. `mask` [b, s] marks the tokens that are targets the loss counts: every
real token in pretraining, only the response tokens in SFT (the prompt is masked out), never
padding. `segment_ids` [b, s] (packed rows: 1, 2, ... per document, 0 = padding) keep a position
from predicting a token of another document. Position i predicting token i + k (k = 1 for the
main head, k + 1 for MTP depth k) counts when

    mask[i + k] == 1  and  segment_ids[i] == segment_ids[i + k] > 0,

and the last k positions of a row have no target. Without segment_ids the row is one document
(and a real input token is implied by a real target, as with right padding).

Chunked cross-entropy (`chunk` > 0): the head matmul and the log-sum-exp run over `chunk`
sequence positions at a time inside a rematerialised scan, so neither the forward nor the backward ever holds the
float32 [b, s, v] logits (at V3's vocabulary of 129280 and a 4 x 4096 batch that would be 8.5 GB
per copy); the backward recomputes each chunk's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.layers.mtp import shift_left


def target_weights(mask, k: int, segment_ids=None):
  """float32 [b, s]: 1 where position i's prediction of token i + k counts (see the docstring)."""
  weights = shift_left(mask.astype(jnp.float32), k)
  if segment_ids is not None:
    ahead = shift_left(segment_ids, k)
    weights = weights * ((segment_ids == ahead) & (segment_ids > 0))
  return weights


def cross_entropy(logits, targets, weights):
  """Mean token cross-entropy. logits [b, s, v] float32, targets int [b, s], weights [b, s]."""
  total, count = _cross_entropy_sums(logits, targets, weights)
  return total / jnp.maximum(count, 1.0)


def _cross_entropy_sums(logits, targets, weights):
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum((logz - gold) * weights), jnp.sum(weights)


def head_cross_entropy(h, w, targets, weights, chunk: int = 0):
  """Mean cross-entropy of the logits h @ w without materialising them when `chunk` > 0.

  Args:
    h: [b, s, m] final-normed hidden states.
    w: [m, v] the output head (float32 logits are computed from float32 copies, as the model's
      head does).
    targets: int [b, s]; weights: [b, s] (0 where a position does not count).
    chunk: sequence positions per chunk (b * chunk tokens); 0 computes the full logits at once.
  """
  h32, w32 = h.astype(jnp.float32), w.astype(jnp.float32)
  if chunk <= 0 or chunk >= targets.shape[1]:
    logits = jnp.einsum("bsm,mv->bsv", h32, w32)
    return cross_entropy(logits, targets, weights)
  hs, ts, ws = (_chunked(x, chunk) for x in (h32, targets, weights.astype(jnp.float32)))

  @jax.checkpoint  # The backward recomputes this chunk's logits instead of keeping them.
  def chunk_sums(h_c, t_c, w_c):
    return _cross_entropy_sums(jnp.einsum("bcm,mv->bcv", h_c, w32), t_c, w_c)

  def body(carry, xs):
    total, count = chunk_sums(*xs)
    return (carry[0] + total, carry[1] + count), None

  zero = jnp.zeros((), jnp.float32)
  (total, count), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ws))
  return total / jnp.maximum(count, 1.0)


def _chunked(x, chunk: int):
  """[b, s, ...] -> [s / chunk, b, chunk, ...], s zero-padded to a multiple of chunk (padding has
  weight 0, so it adds nothing to either sum). Chunks cut the sequence, not the batch, so a batch
  sharded over devices stays sharded inside every chunk."""
  x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % chunk)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def next_token_loss(logits, tokens, mask=None, segment_ids=None):
  """Position i predicts tokens[i + 1]; the last position has no target."""
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask
  return cross_entropy(logits, shift_left(tokens, 1), target_weights(mask, 1, segment_ids))


def mtp_loss(mtp_logits, tokens, mask=None, segment_ids=None):
  """(1/D) sum_k L^k, where depth k at position i predicts tokens[i + k + 1]. mtp_logits [n, b, s, v]."""
  depth = mtp_logits.shape[0]
  if depth == 0:
    return jnp.zeros((), jnp.float32)
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask
  losses = []
  for k in range(1, depth + 1):
    weights = target_weights(mask, k + 1, segment_ids)
    losses.append(cross_entropy(mtp_logits[k - 1], shift_left(tokens, k + 1), weights))
  return sum(losses) / depth


def lm_losses(h, mtp_h, w, tokens, mask=None, segment_ids=None, chunk: int = 0):
  """(next-token loss, MTP loss) from hidden states, chunked as `head_cross_entropy`.

  Args:
    h: [b, s, m] the main trunk's final-normed hidden states.
    mtp_h: [n, b, s, m] each MTP depth's final-normed hidden states (n may be 0).
    w: [m, v] the shared output head.
  """
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask
  lm = head_cross_entropy(h, w, shift_left(tokens, 1), target_weights(mask, 1, segment_ids), chunk)
  depth = mtp_h.shape[0]
  if depth == 0:
    return lm, jnp.zeros((), jnp.float32)
  losses = [
    head_cross_entropy(
      mtp_h[k - 1], w, shift_left(tokens, k + 1), target_weights(mask, k + 1, segment_ids), chunk
    )
    for k in range(1, depth + 1)
  ]
  return lm, sum(losses) / depth
