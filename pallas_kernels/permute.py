"""Token dispatch: sort the (token, slot) pairs by expert, and combine the expert outputs back.

Dims: T tokens, K slots (experts) per token, R = T*K pairs (sorted rows), D row width in,
F row width out, E experts.

Pair (t, k) is entry p = t*K + k of experts.reshape(-1). `order` [R] is the STABLE argsort of
those expert ids, so sorted row i holds pair order[i] and, within one expert, rows keep token
order; inv = order^-1 maps a pair to its sorted row.
  permute:   x_sorted[i] = x[order[i] // K];  group_sizes[e] = #{p : experts.flat[p] == e}
  unpermute: out[t] = sum_k weights[t, k] * y_sorted[inv[t*K + k]]

Both are gathers. The transpose of a gather is a scatter-add, which is slow on XLA:CPU, so the
xla impl gives each op a custom VJP that is a gather through the other permutation (as
MaxText does):
  permute:   dx[t]          = sum_k dx_sorted[inv[t*K + k]]
  unpermute: dy_sorted[i]   = weights.flat[order[i]] * dout[order[i] // K]
             dweights[t, k] = <dout[t], y_sorted[inv[t*K + k]]>
The reference impl is the same forward math under plain autodiff.

The pallas impl (permute_pallas.py) computes the sort order without a sort (per-block histograms
and ranks), and runs the gathers and the combine as Pallas kernels (Mosaic TPU row DMAs, Triton
pointer gathers on GPU, interpret mode on CPU), with the same VJP structure.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import permute_pallas as kernels
from pallas_kernels._impl import resolve_impl
from pallas_kernels.permute_pallas import BlockSizes


def inverse_permutation(order: jax.Array) -> jax.Array:
  """inv with inv[order[i]] = i. [R] int32 -> [R] int32."""
  n = order.shape[0]
  # A scatter without accumulation of unique indices: one pass, no sort.
  return (
    jnp.zeros((n,), jnp.int32)
    .at[order]
    .set(jnp.arange(n, dtype=jnp.int32), unique_indices=True, mode="promise_in_bounds")
  )


def _take_rows(a: jax.Array, rows: jax.Array) -> jax.Array:
  return a.at[rows].get(mode="promise_in_bounds")


def _sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """experts [T, K] -> (order [R] int32, group_sizes [E] int32)."""
  flat = experts.reshape(-1).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sorted_ids = _take_rows(flat, order)
  ends = jnp.searchsorted(sorted_ids, jnp.arange(num_experts, dtype=jnp.int32), side="right")
  group_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
  return order, group_sizes


def _sum_slots(rows, slots, weights):
  """out[t] = sum_k weights[t, k] * rows[slots[t, k]] (weights None: all ones), in float32.

  One gather per slot k, summed: XLA fuses the K gathers and adds into one loop that reads
  each row once; the [T, K, F] gather a reshape-and-sum would build is materialised instead
  (~10x slower here, most of it page faults on the fresh buffer).
  """
  out = None
  for j in range(slots.shape[1]):
    term = _take_rows(rows, slots[:, j]).astype(jnp.float32)
    if weights is not None:
      term = term * weights[:, j : j + 1].astype(jnp.float32)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_sorted(x, order, k):
  return _take_rows(x, order // k)


def _gather_sorted_fwd(x, order, k):
  return _take_rows(x, order // k), order


def _gather_sorted_bwd(k, order, dx_sorted):
  slots = inverse_permutation(order).reshape(-1, k)
  return _sum_slots(dx_sorted, slots, None).astype(dx_sorted.dtype), None


_gather_sorted.defvjp(_gather_sorted_fwd, _gather_sorted_bwd)


@jax.custom_vjp
def _combine(y_sorted, order, weights):
  slots = inverse_permutation(order).reshape(weights.shape)
  return _sum_slots(y_sorted, slots, weights).astype(y_sorted.dtype)


def _combine_fwd(y_sorted, order, weights):
  slots = inverse_permutation(order).reshape(weights.shape)
  out = _sum_slots(y_sorted, slots, weights).astype(y_sorted.dtype)
  return out, (y_sorted, order, slots, weights)


def _combine_bwd(res, dout):
  y_sorted, order, slots, weights = res
  k = weights.shape[1]
  dout_rows = _take_rows(dout.astype(jnp.float32), order // k)  # [R, F]: dout of each row's token
  w_sorted = _take_rows(weights.reshape(-1).astype(jnp.float32), order)
  dy_sorted = dout_rows * w_sorted[:, None]
  # <dout[t], y[row]> per sorted row, then back to (t, k) order: a [R] gather, not [R, F].
  dots = jnp.sum(y_sorted.astype(jnp.float32) * dout_rows, axis=-1)
  dweights = _take_rows(dots, slots)
  return dy_sorted.astype(y_sorted.dtype), None, dweights.astype(weights.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


# ----------------------------------------------------------------------------- pallas impl


def _per_platform(call, block_sizes: BlockSizes | None, *args):
  """call(*args, block_sizes=, interpret=, backend=) for the platform being lowered for.

  Chosen by lax.platform_dependent at lowering time: interpret mode of the TPU bodies on CPU,
  Mosaic on TPU, Triton on GPU (cuda and rocm). None block sizes take the platform's entry of
  permute_pallas.TUNED_BLOCK_SIZES.
  """

  def build(platform):
    return functools.partial(
      call,
      block_sizes=block_sizes or kernels.TUNED_BLOCK_SIZES[platform],
      interpret=platform == "cpu",
      backend="gpu" if platform == "gpu" else "tpu",
    )

  return lax.platform_dependent(*args, cpu=build("cpu"), tpu=build("tpu"), default=build("gpu"))


def _gather_rows(block_sizes, x, src, scale=None, y=None):
  return _per_platform(kernels.gather_rows_call, block_sizes, x, src, scale, y)


def _combine_rows(block_sizes, y, slots, weights):
  return _per_platform(kernels.combine_rows_call, block_sizes, y, slots, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gather_sorted_pallas(k, block_sizes, x, order, inv):
  return _gather_rows(block_sizes, x, order // k)


def _gather_sorted_pallas_fwd(k, block_sizes, x, order, inv):
  return _gather_rows(block_sizes, x, order // k), inv


def _gather_sorted_pallas_bwd(k, block_sizes, inv, dx_sorted):
  slots = inv.reshape(-1, k)
  ones = jnp.ones(slots.shape, jnp.float32)
  return _combine_rows(block_sizes, dx_sorted, slots, ones), None, None


_gather_sorted_pallas.defvjp(_gather_sorted_pallas_fwd, _gather_sorted_pallas_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine_pallas(block_sizes, y_sorted, order, inv, weights):
  return _combine_rows(block_sizes, y_sorted, inv.reshape(weights.shape), weights)


def _combine_pallas_fwd(block_sizes, y_sorted, order, inv, weights):
  out = _combine_rows(block_sizes, y_sorted, inv.reshape(weights.shape), weights)
  return out, (y_sorted, order, inv, weights)


def _combine_pallas_bwd(block_sizes, res, dout):
  y_sorted, order, inv, weights = res
  k = weights.shape[1]
  w_sorted = _take_rows(weights.reshape(-1).astype(jnp.float32), order)  # [R]
  dout = dout.astype(y_sorted.dtype)
  # One kernel: dy_sorted[i] = w_sorted[i] * dout[order[i] // K] and the dots <that row, y[i]>.
  dy_sorted, dots = _gather_rows(block_sizes, dout, order // k, w_sorted, y_sorted)
  dweights = _take_rows(dots, inv).reshape(weights.shape)  # back to (t, k) order: [R], not [R, F]
  return dy_sorted, None, None, dweights.astype(weights.dtype)


_combine_pallas.defvjp(_combine_pallas_fwd, _combine_pallas_bwd)


def _permute_pallas(x, experts, num_experts, block_sizes):
  def metadata(experts, **kw):
    return kernels.dispatch_metadata_call(experts, num_experts, **kw)

  inv, group_sizes = _per_platform(metadata, block_sizes, experts)
  # The kernels give each pair its row (inv); the gather wants each row's pair (order).
  order = inverse_permutation(inv)
  x_sorted = _gather_sorted_pallas(experts.shape[1], block_sizes, x, order, inv)
  return x_sorted, group_sizes, order


# ----------------------------------------------------------------------------- public ops


def permute(
  x: jax.Array,
  experts: jax.Array,
  num_experts: int,
  *,
  impl: str = "auto",
  block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sorts the T*K (token, slot) rows of x stably by expert id.

  Args:
    x: [T, D] token rows.
    experts: [T, K] int32 expert ids in [0, E).
    num_experts: E.
    impl: "auto" | "xla" | "reference" | "pallas".
    block_sizes: the pallas impl's blocks; None takes permute_pallas.TUNED_BLOCK_SIZES.

  Returns:
    x_sorted [R, D] (rows grouped by expert, token order within an expert), group_sizes [E]
    int32, and perm [R] int32 (the sort order; pass it to `unpermute`).
  """
  impl = resolve_impl(impl, "permute")
  x, experts = jnp.asarray(x), jnp.asarray(experts)
  t, k = experts.shape
  if x.shape[0] != t:
    raise ValueError(f"permute: x has {x.shape[0]} rows but experts has {t}")
  if impl == "pallas":
    return _permute_pallas(x, experts, num_experts, block_sizes)
  order, group_sizes = _sort_by_expert(experts, num_experts)
  if impl == "reference":
    return permute_reference_rows(x, order, k), group_sizes, order
  return _gather_sorted(x, order, k), group_sizes, order


def permute_reference(
  x: jax.Array, experts: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`permute` in plain jnp under plain autodiff (arguments and results as there)."""
  order, group_sizes = _sort_by_expert(jnp.asarray(experts), num_experts)
  return permute_reference_rows(jnp.asarray(x), order, experts.shape[1]), group_sizes, order


def permute_reference_rows(x: jax.Array, order: jax.Array, k: int) -> jax.Array:
  """The readable gather under plain autodiff: x_sorted[i] = x[order[i] // K]."""
  return x[order // k]


def unpermute(
  y_sorted: jax.Array,
  perm: jax.Array,
  weights: jax.Array,
  *,
  impl: str = "auto",
  block_sizes: BlockSizes | None = None,
) -> jax.Array:
  """Weighted sum of each token's K expert outputs, back in token order.

  Args:
    y_sorted: [R, F] expert outputs in the sorted order `permute` produced.
    perm: [R] int32, the `perm` returned by `permute`.
    weights: [T, K] routing weights.
    impl: "auto" | "xla" | "reference" | "pallas".
    block_sizes: the pallas impl's blocks; None takes permute_pallas.TUNED_BLOCK_SIZES.

  Returns:
    [T, F] in y_sorted's dtype (accumulated in float32).
  """
  impl = resolve_impl(impl, "unpermute")
  y_sorted, perm, weights = jnp.asarray(y_sorted), jnp.asarray(perm), jnp.asarray(weights)
  t, k = weights.shape
  if y_sorted.shape[0] != t * k or perm.shape != (t * k,):
    raise ValueError(
      f"unpermute: y_sorted {y_sorted.shape} and perm {perm.shape} need T*K={t * k} rows"
    )
  if impl == "reference":
    return unpermute_reference(y_sorted, perm, weights)
  if impl == "pallas":
    perm = perm.astype(jnp.int32)
    return _combine_pallas(block_sizes, y_sorted, perm, inverse_permutation(perm), weights)
  return _combine(y_sorted, perm, weights)


def unpermute_reference(y_sorted: jax.Array, perm: jax.Array, weights: jax.Array) -> jax.Array:
  """The readable combine under plain autodiff (inverse by argsort)."""
  t, k = weights.shape
  inv = jnp.argsort(perm)
  rows = y_sorted[inv].reshape(t, k, -1).astype(jnp.float32)
  out = jnp.einsum("tkf,tk->tf", rows, weights.astype(jnp.float32))
  return out.astype(y_sorted.dtype)
