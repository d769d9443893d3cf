"""Causal token merging and inflation: fewer tokens through a band of layers, every position out.

Optional and off in every DeepSeek preset (`ModelConfig.merge_ratio` 0). With a ratio rho, at the
input of layer `merge_layer` r = floor(rho * s) tokens of each row give up their slot, so layers
[merge_layer, inflate_layer) run on s - r tokens; at the input of `inflate_layer` the stream goes
back to s positions and the LM head predicts every one of them.

Dims: b batch, s tokens, n slots after merging (s - r), m model dim.

Why this shape (a causal language model constrains merging more than a ViT, where ToMe began):
merging the adjacent pair (p, p + 1) into one slot leaves position p without a slot of its own,
so p's output after inflation must come from elsewhere, and for the model to stay causal that
must not depend on whether the pair merged, which depends on token p + 1. So the decision to
give up p's slot uses only tokens <= p: the similarity of p's key to its predecessor's (the
causal half of ToMe's bipartite matching of adjacent tokens):

- Matching: sim_p = cos(x_{p-1}, x_p) over the residual stream entering the merge layer (the
  keys of that layer's attention are a linear map of it). Candidates are 1 <= p <= s - 2, in the
  same packed segment as both neighbours.
- Selection, exactly r per row, each decision from the past alone: walking p left to right, p is
  a rider when fewer than r are chosen and sim_p >= merge_threshold, or when the row is behind
  the pace floor(r * k / candidates) at its k-th candidate, or when the candidates left are
  needed to reach r. (A threshold of 1 gives evenly spaced merges; -1 the first r candidates.)
- Merging: a rider rides forward into the next kept token's slot; a slot's content is the mean
  of its members weighted by their sizes (each token is size 1; a run of riders gives a slot of
  size > 2), and the slot keeps the kept token's position and segment. Every member of a slot is
  at or before that position, so a merged token only combines tokens in the past of every query
  that sees it.
- Inflation: position p reads slot src(p): its own slot when kept, the last kept slot before it
  when a rider (never the slot its own content went to). z_p = y_src(p) + g * (x_p - m_src(p))
  with m the slot's merged input and g [m] a learned residual gate (initialised to ones, so
  with the band an identity the stream comes back exactly as it went in). A kept token alone in
  its slot has x_p - m_src(p) = 0 exactly: with zero merges inflation is the identity.

Decoding with merging is not supported (merging is a training and full-forward option).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig


def merge_count(length: int, ratio: float) -> int:
  """Tokens that give up their slot in a row of `length`: floor(ratio * length), leaving room for
  the first and last tokens (never riders)."""
  return max(0, min(int(length * ratio), length - 2))


@dataclasses.dataclass(frozen=True)
class MergeState:
  """What inflation needs: which slot each position reads and the merged band's input."""

  source: jax.Array  # int32 [b, s]: the slot position p reads after the band
  merged_input: jax.Array  # [b, n, m]: the slots' content entering the band
  sizes: jax.Array  # int32 [b, n]: tokens per slot


jax.tree_util.register_dataclass(MergeState, ["source", "merged_input", "sizes"], [])


def adjacent_similarity(x):
  """x [b, s, m] -> float32 [b, s]: cos(x_{p-1}, x_p), and -inf at p = 0."""
  x = x.astype(jnp.float32)
  unit = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
  sim = jnp.sum(unit[:, 1:] * unit[:, :-1], axis=-1)
  return jnp.pad(sim, ((0, 0), (1, 0)), constant_values=-jnp.inf)


def select_riders(similarity, segment_ids, count: int, threshold: float):
  """Exactly `count` riders per row, each chosen from the past (module docstring).

  similarity float [b, s]; segment_ids int [b, s] or None -> bool [b, s].
  """
  b, s = similarity.shape
  if count == 0:
    return jnp.zeros((b, s), jnp.bool_)
  p = jnp.arange(s)
  candidate = jnp.broadcast_to((p >= 1) & (p <= s - 2), (b, s))
  if segment_ids is not None:
    same_prev = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (1, 0)))
    same_next = jnp.pad(segment_ids[:, :-1] == segment_ids[:, 1:], ((0, 0), (0, 1)))
    eligible = candidate & same_prev & same_next
  else:
    eligible = candidate
  n_candidates = jnp.sum(eligible, axis=1)  # [b]
  ordinal = jnp.cumsum(eligible, axis=1)  # k at the k-th candidate
  pace = (count * ordinal) // jnp.maximum(n_candidates, 1)[:, None]
  candidates_left = n_candidates[:, None] - ordinal + eligible  # from p on, p included
  # A row with fewer candidates than merges (packed documents of 1-2 tokens) fills up with its
  # last positions, across a document boundary: the slot count is static.
  positions_left = jnp.broadcast_to(s - 1 - p, (b, s))

  def step(chosen, inputs):
    sim, ok, k_pace, left, usable, plain_left = inputs
    need = count - chosen
    wanted = ok & ((sim >= threshold) | (chosen < k_pace) | (left <= need))
    take = (chosen < count) & (wanted | (usable & (plain_left <= need)))
    return chosen + take, take

  xs = (similarity, eligible, pace, candidates_left, candidate, positions_left)
  xs = tuple(jnp.moveaxis(a, 1, 0) for a in xs)
  _, riders = jax.lax.scan(step, jnp.zeros((b,), jnp.int32), xs)
  return jnp.moveaxis(riders, 0, 1)


def merge_tokens(x, positions, segment_ids, riders, slots: int):
  """Merges riders into the next kept slot.

  x [b, s, m], positions int [b, s], segment_ids int [b, s] or None, riders bool [b, s] with
  exactly s - slots True per row -> (merged x [b, n, m], positions [b, n], segment ids [b, n] or
  None, MergeState).
  """
  kept = ~riders
  kept_before_or_at = jnp.cumsum(kept, axis=1, dtype=jnp.int32)
  destination = kept_before_or_at - kept  # a kept token's own slot; a rider's next kept slot
  source = kept_before_or_at - 1  # a kept token's own slot; a rider's last kept slot before it

  def per_row(values, dest):
    return jax.ops.segment_sum(values, dest, num_segments=slots, indices_are_sorted=True)

  sizes = jax.vmap(per_row)(jnp.ones(riders.shape, jnp.int32), destination)
  total = jax.vmap(per_row)(x.astype(jnp.float32), destination)
  merged = (total / sizes[..., None]).astype(x.dtype)
  index = jnp.broadcast_to(jnp.arange(riders.shape[1], dtype=jnp.int32), riders.shape)
  kept_index = jax.vmap(
    lambda i, d: jax.ops.segment_max(i, d, num_segments=slots, indices_are_sorted=True)
  )(jnp.where(kept, index, -1), destination)
  take = lambda a: jnp.take_along_axis(a, kept_index, axis=1)
  merged_segments = None if segment_ids is None else take(segment_ids)
  state = MergeState(source=source, merged_input=merged, sizes=sizes)
  return merged, take(positions), merged_segments, state


def merge(cfg: ModelConfig, x, positions, segment_ids):
  """The merge step at `cfg.merge_layer`: x [b, s, m] -> (x [b, n, m], positions, segment ids,
  MergeState)."""
  count = merge_count(x.shape[1], cfg.merge_ratio)
  riders = select_riders(adjacent_similarity(x), segment_ids, count, cfg.merge_threshold)
  return merge_tokens(x, positions, segment_ids, riders, x.shape[1] - count)


class Inflate(nn.Module):
  """Back to every position: z_p = y_src(p) + gate * (x_p - m_src(p)) (module docstring)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, y, before, state: MergeState):
    """y [b, n, m] (the band's output), before [b, s, m] (the stream the merge took) -> [b, s, m]."""
    gate = self.param("gate", nn.initializers.ones, (self.cfg.hidden_size,), self.cfg.param_dtype)
    take = lambda a: jnp.take_along_axis(a, state.source[..., None], axis=1)
    residual = before - take(state.merged_input)
    return take(y) + gate.astype(y.dtype) * residual
