"""Language-model losses: next-token cross-entropy and the multi-token-prediction loss.

Dims: b batch, s sequence, v vocabulary, n MTP depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.layers.mtp import shift_left


def cross_entropy(logits, targets, mask):
  """Mean token cross-entropy. logits [b, s, v] float32, targets int [b, s], mask [b, s] (0/1)."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum((logz - gold) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(logits, tokens, mask=None):
  """Position i predicts tokens[i + 1]; the last position has no target."""
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  valid = shift_left(mask, 1) * mask  # Both the input and its target must be real tokens.
  return cross_entropy(logits, shift_left(tokens, 1), valid)


def mtp_loss(mtp_logits, tokens, mask=None):
  """(1/D) sum_k L^k, where depth k at position i predicts tokens[i + k + 1]. mtp_logits [n, b, s, v]."""
  depth = mtp_logits.shape[0]
  if depth == 0:
    return jnp.zeros((), jnp.float32)
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  losses = []
  for k in range(1, depth + 1):
    valid = shift_left(mask, k + 1) * mask
    losses.append(cross_entropy(mtp_logits[k - 1], shift_left(tokens, k + 1), valid))
  return sum(losses) / depth
