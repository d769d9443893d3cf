"""Routed experts: each token's K chosen SwiGLU experts, through the dispatch ops.

Dims: T tokens, D model, F expert ffn, E experts, K experts per token, R = T*K sorted rows,
C expert capacity.

  x_sorted, group_sizes, perm = permute(x, experts, E)    [R, D]   rows sorted by expert
  h   = gmm(x_sorted, wi, group_sizes)                     [R, 2F]  wi [E, D, 2F] = [gate | up]
                                                                   (or [E, D, 2, F], unflattened)
  a   = silu(h[:, :F]) * h[:, F:]                          [R, F]
  y   = gmm(a, wo, group_sizes)                            [R, D]   wo [E, F, D]
  out = unpermute(y, perm, weights)                        [T, D]   out[t] = sum_k w[t,k] y[t,k]

The gate and up projections share one grouped matmul (wi holds the gate columns, then the up
columns). Compute runs in x.dtype with float32 accumulation.

Dropless by default (DeepSeek drops no tokens). With a capacity factor cf, expert e accepts at
most C = ceil(cf * T * K / E) pairs, first come first served in token order. A dropped pair
gets weight zero and the extra expert id E, which the stable sort places behind every kept
row; the grouped matmuls stop at sum(group_sizes[:E]) and leave those rows zero, so dropped
pairs cost no expert FLOPs and contribute nothing to the output or to any gradient.

Decode sizes (the xla impl, R <= 2E: most experts get at most a pair or two, as when a decode
step routes a few tokens) skip the sort and the grouped matmuls: a loop over the R pairs runs
one vector-matrix product per pair against its expert's weights, read in place. On the 2-core
CPU VM (`small`'s experts, E 64, D 512, F 256, K 6; 2026-11-24) a layer's routed experts took
2.7 against 7.3 ms at 4 tokens, 4.5 against 14.3 at 8, and 9.0 against 33 at 16: the grouped
loops copy each used expert's weights before a matmul of one or two rows. The pair loop still
copies each pair's expert weights out of the stack; with `cpu_kernel` (the MoE layer passes
`ModelConfig.cpu_kernels`) XLA:CPU runs `r1jax.cpu_kernels.routed_experts` instead, which
streams each used expert's weights once (~1.4 ms a layer at 4 tokens, 2026-11-25).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import gmm, inverse_permutation, permute, unpermute
from pallas_kernels._impl import resolve_impl
from r1jax.cpu_kernels.routed_experts import routed_experts_decode


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
  """C = ceil(capacity_factor * T * K / E), the most pairs one expert accepts."""
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0 (None for dropless), got {capacity_factor}")
  return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_mask(experts: jax.Array, num_experts: int, capacity: int) -> jax.Array:
  """Which pairs their expert accepts: the first `capacity` in token order.

  Args:
    experts: [T, K] int32 expert ids.
    num_experts: E.
    capacity: C.

  Returns:
    [T, K] bool, True where the pair is kept.
  """
  flat = experts.reshape(-1)
  # Stable sort: within an expert, pairs stay in token order, so a pair's rank inside its
  # expert is its sorted position minus where the expert's run starts.
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sorted_ids = flat[order]
  starts = jnp.searchsorted(sorted_ids, jnp.arange(num_experts, dtype=flat.dtype), side="left")
  rank_sorted = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[sorted_ids]
  rank = rank_sorted[inverse_permutation(order)]
  return (rank < capacity).reshape(experts.shape)


def _check_shapes(x, weights, experts, wi, wo):
  t, d = x.shape
  e, f = wo.shape[0], wo.shape[1]
  if weights.shape != experts.shape or experts.shape[0] != t:
    raise ValueError(
      f"routed_experts: weights {weights.shape} and experts {experts.shape} must be [T={t}, K]"
    )
  if wi.shape not in ((e, d, 2 * f), (e, d, 2, f)) or wo.shape != (e, f, d):
    raise ValueError(
      f"routed_experts: need wi [E, D, 2F] (or [E, D, 2, F]) and wo [E, F, D] with D={d}; "
      f"got wi {wi.shape}, wo {wo.shape}"
    )


def routed_experts(
  x: jax.Array,
  weights: jax.Array,
  experts: jax.Array,
  wi: jax.Array,
  wo: jax.Array,
  *,
  impl: str = "auto",
  capacity_factor: float | None = None,
  drop_id: bool = False,
  cpu_kernel: bool = False,
) -> jax.Array:
  """Weighted sum of each token's K routed SwiGLU experts.

  Args:
    x: [T, D] tokens.
    weights: [T, K] routing weights.
    experts: [T, K] int32 expert ids.
    wi: [E, D, 2F] gate then up projections, or [E, D, 2, F] (the MoE param as stored: passed
      unflattened, the backward keeps the param itself rather than a reshaped copy).
    wo: [E, F, D] down projections.
    impl: dispatch-op implementation, "auto" | "xla" | "reference" | "pallas".
    capacity_factor: None for dropless; else each expert keeps its first
      ceil(capacity_factor * T * K / E) pairs in token order and drops the rest.
    drop_id: experts may hold the id E, meaning "no expert here" (the pair is skipped); the
      expert-parallel exchange marks other shards' pairs this way.
    cpu_kernel: decode sizes on XLA:CPU run `r1jax.cpu_kernels.routed_experts`' C++ kernel
      (False: XLA's loop over pairs).

  Returns:
    [T, D] in x.dtype.
  """
  x, weights, experts, wi, wo = map(jnp.asarray, (x, weights, experts, wi, wo))
  _check_shapes(x, weights, experts, wi, wo)
  t, k = experts.shape
  e, f = wo.shape[0], wo.shape[1]
  num_ids = e + 1 if drop_id else e
  if capacity_factor is not None:
    keep = capacity_mask(experts, e, expert_capacity(capacity_factor, t, k, e))
    weights = jnp.where(keep, weights, 0)
    experts = jnp.where(keep, experts, e)  # the overflow id, sorted behind the kept rows
    num_ids = e + 1
  if resolve_impl(impl, "routed_experts") == "xla" and t * k <= 2 * e:
    wi = wi.reshape(e, -1, 2 * f)
    if cpu_kernel:  # on XLA:CPU, one pass over each used expert's weights (r1jax.cpu_kernels)
      return routed_experts_decode(x, weights, experts, wi, wo, reference=_pairwise_experts)
    return _pairwise_experts(x, weights, experts, wi, wo)
  x_sorted, group_sizes, perm = permute(x, experts, num_ids, impl=impl)
  group_sizes = group_sizes[:e]
  h = gmm(x_sorted, wi.astype(x.dtype), group_sizes, impl=impl)
  a = jax.nn.silu(h[:, :f]) * h[:, f:]
  y = gmm(a, wo.astype(x.dtype), group_sizes, impl=impl)
  return unpermute(y, perm, weights, impl=impl)


def _pairwise_experts(x, weights, experts, wi, wo) -> jax.Array:
  """One (token, expert) pair per loop step: x[t] @ wi[e], SwiGLU, @ wo[e], weighted into
  out[t]. An id >= E (dropped, or another shard's) contributes nothing and reads no weights."""
  t, k = experts.shape
  e, f = wo.shape[0], wo.shape[1]
  flat, w_flat = experts.reshape(-1), weights.reshape(-1)

  def pair(p, out):
    token, expert = p // k, flat[p]

    def run(out):
      # float32 products, as the grouped loops (XLA:CPU has no bf16 x bf16 -> f32 dot in loops)
      xe = lax.dynamic_index_in_dim(x, token, 0, keepdims=False).astype(jnp.float32)
      h = jnp.dot(xe, wi[expert].astype(jnp.float32))
      a = jax.nn.silu(h[:f]) * h[f:]
      y = jnp.dot(a.astype(x.dtype).astype(jnp.float32), wo[expert].astype(jnp.float32))
      return out.at[token].add(w_flat[p].astype(jnp.float32) * y)

    return lax.cond(expert < e, run, lambda out: out, out)

  out = lax.fori_loop(0, t * k, pair, jnp.zeros((t, x.shape[1]), jnp.float32))
  return out.astype(x.dtype)


def routed_experts_dense_reference(
  x: jax.Array, weights: jax.Array, experts: jax.Array, wi: jax.Array, wo: jax.Array
) -> jax.Array:
  """Every expert on every token, combined with a dense [T, E] weight matrix.

  The independent check of `routed_experts` (dropless): E times the work, no dispatch ops.
  Arguments and result as in `routed_experts`.
  """
  x, weights, experts, wi, wo = map(jnp.asarray, (x, weights, experts, wi, wo))
  _check_shapes(x, weights, experts, wi, wo)
  e, f = wo.shape[0], wo.shape[1]
  wi = wi.reshape(e, -1, 2 * f)
  dense_w = jnp.sum(jax.nn.one_hot(experts, e, dtype=jnp.float32) * weights[..., None], axis=1)
  h = jnp.einsum("td,edf->tef", x, wi.astype(x.dtype), preferred_element_type=jnp.float32)
  a = jax.nn.silu(h[..., :f]) * h[..., f:]
  y = jnp.einsum("tef,efd->ted", a, wo.astype(jnp.float32))
  return jnp.einsum("ted,te->td", y, dense_w).astype(x.dtype)
