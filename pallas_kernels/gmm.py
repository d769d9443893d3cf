"""Grouped matrix multiplication (GMM) and its transpose (TGMM), megablox's pattern in pure JAX.

Dims: M rows, K contraction, N output columns, G groups.

Group g owns the contiguous rows [o_g, o_g + group_sizes[g]) of lhs, o_g = sum_{h<g} sizes[h]:
  gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]
      out[r] = lhs[r] @ rhs[g] for r in group g; rows >= sum(group_sizes) are zero.
  tgmm(lhs [M, K], dout [M, N], group_sizes [G]) -> [G, K, N]
      tgmm[g] = lhs[rows of g]^T @ dout[rows of g] (zero for an empty group).
  VJP of gmm: dlhs = gmm(dout, rhs^T), drhs = tgmm(lhs, dout)   (megablox ops.py).
sum(group_sizes) must not exceed M.

The xla impl is the fast CPU path. XLA's lax.ragged_dot runs at ~1% of the matmul peak on
CPU, so instead a fori_loop over the groups that have rows slices each group's weights once
and runs two inner loops with data-dependent trip counts: the group's full tiles of `rows` rows
as plain 2-D matmuls written back with dynamic_update_slice, then its remainder in masked tiles
of `tail_rows` rows (fewer when the groups average fewer rows: a decode step's few tokens over
many experts). Only the tiles in use are visited, and the masked waste per group is under
`tail_rows` rows. A loop with a data-dependent trip count has no reverse-mode derivative, so
the xla impl carries its own custom VJP built from the same loops: dlhs is the gmm loop with
each group's weights transposed once, drhs accumulates tile^T @ dout_tile in a [K, N] float32
carry per group. The reference impl is a scan over groups of masked dense matmuls (G times
the work) under plain autodiff. The pallas impl (Mosaic TPU and Triton GPU kernels, interpret
mode on CPU) lives in gmm_pallas.py.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import gmm_pallas
from pallas_kernels._impl import resolve_impl


@dataclasses.dataclass(frozen=True)
class GmmTiling:
  """Row tiles of the xla loops (K and N are left whole: XLA's dot blocks them itself).

  Attributes:
    rows: tile of the unmasked loop over a group's full tiles; bigger tiles give bigger 2-D
      matmuls and fewer loop steps.
    tail_rows: tile of the masked loop over a group's last partial tile; smaller tiles spend
      less work on masked rows.
  """

  rows: int = 256
  tail_rows: int = 64

  def __post_init__(self):
    if not (isinstance(self.rows, int) and isinstance(self.tail_rows, int)):
      raise TypeError(f"GmmTiling sizes must be ints, got {self}")
    if self.rows < 1 or self.tail_rows < 1 or self.tail_rows > self.rows:
      raise ValueError(f"GmmTiling needs 1 <= tail_rows <= rows, got {self}")


# Tuned with experiments/benchmarks/moe_layer.py, keyed by backend. CPU: 2-core AVX2, fp32,
# M=24576 rows, (K, N) in {(512, 512), (256, 512)}: 256/64 and 128/64 tie within the machine's
# noise, a single 64-row tile is ~10% slower; 256/64 makes fewer, bigger matmuls.
TUNED_TILING = types.MappingProxyType({"cpu": GmmTiling(rows=256, tail_rows=64)})


def _resolve_tiling(tile: int | GmmTiling | None) -> GmmTiling:
  if tile is None:
    return TUNED_TILING.get(jax.default_backend(), GmmTiling())
  if isinstance(tile, GmmTiling):
    return tile
  return GmmTiling(rows=tile, tail_rows=tile)


def _pallas_block_sizes(tile) -> gmm_pallas.BlockSizes | None:
  if tile is None or isinstance(tile, gmm_pallas.BlockSizes):
    return tile
  raise ValueError(f"gmm: impl='pallas' takes tile=gmm_pallas.BlockSizes or None, got {tile!r}")


def _group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  ends = jnp.cumsum(group_sizes, dtype=jnp.int32)
  return ends - group_sizes, ends


def _tile_sizes(m: int, num_groups: int, tiling: GmmTiling) -> tuple[int, int]:
  """(full tile, tail tile) rows for M rows over G groups.

  When the groups average fewer rows than the tail tile, the tail tile shrinks to that average
  (a power of two, at least 1): decoding routes a few tokens' pairs over many experts, and a
  group of one row would otherwise run a whole masked tile. Training sizes keep the tuned tiles.
  """
  tail = min(tiling.tail_rows, m)
  per_group = m // num_groups
  if per_group < tail:
    tail = 1 << (max(per_group, 1).bit_length() - 1)
  return min(tiling.rows, m), tail


def _f32(a: jax.Array) -> jax.Array:
  # XLA:CPU (jax 0.10.2) has no BF16 x BF16 -> F32 dot inside these loops ("Unsupported element
  # type for DotThunk"), so tiles are upcast: tile-sized converts, and exact float32 products.
  return a.astype(jnp.float32)


def _row_mask(r0, tm: int, begin, end) -> jax.Array:
  rows = r0 + jnp.arange(tm, dtype=jnp.int32)
  return (rows >= begin) & (rows < end)


# ----------------------------------------------------------------------------- gmm loops


def _gmm_full_tiles(lhs, w, out, start, count, tm: int):
  """out[start + j*tm : ... + tm] = lhs[same rows] @ w for j < count; all rows in the group."""

  def body(j, out):
    r0 = start + j * tm
    y = jnp.dot(_f32(lax.dynamic_slice_in_dim(lhs, r0, tm)), w)
    return lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), r0, 0)

  return lax.fori_loop(0, count, body, out)


def _gmm_tail_tiles(lhs, w, out, begin, end, tm: int):
  """out[begin:end] = lhs[begin:end] @ w in masked tiles of tm rows (end - begin is small)."""
  m = lhs.shape[0]

  def body(j, out):
    # A tile that would run past row M starts early; the rows before its nominal start `lo`
    # were done by an earlier tile and keep their value.
    lo = begin + j * tm
    r0 = jnp.minimum(lo, m - tm)
    y = jnp.dot(_f32(lax.dynamic_slice_in_dim(lhs, r0, tm)), w)
    keep = _row_mask(r0, tm, lo, end)[:, None]
    new = jnp.where(keep, y.astype(out.dtype), lax.dynamic_slice_in_dim(out, r0, tm))
    return lax.dynamic_update_slice_in_dim(out, new, r0, 0)

  return lax.fori_loop(0, (end - begin + tm - 1) // tm, body, out)


def _gmm_loop(lhs, rhs, group_sizes, tiling: GmmTiling, transpose_rhs: bool, out_dtype):
  """The xla gmm: [M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N]."""
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out = jnp.zeros((m, n), out_dtype)  # rows past sum(group_sizes) stay zero
  if m == 0:
    return out
  num_groups = rhs.shape[0]
  big, small = _tile_sizes(m, num_groups, tiling)
  starts, ends = _group_bounds(group_sizes)
  # Only the groups that have rows: each visit copies its group's weights, which a decode step
  # (24 pairs over 64 experts on `small`) would otherwise pay for every empty expert too.
  used = jnp.nonzero(group_sizes > 0, size=num_groups, fill_value=0)[0]

  def group(i, out):
    g = used[i]
    # One copy of the group's weights (transposed if asked), reused by every tile below.
    w = lax.dynamic_index_in_dim(rhs, g, 0, keepdims=False)
    w = _f32(w.T if transpose_rhs else w)
    full = (ends[g] - starts[g]) // big
    out = _gmm_full_tiles(lhs, w, out, starts[g], full, big)
    return _gmm_tail_tiles(lhs, w, out, starts[g] + full * big, ends[g], small)

  return lax.fori_loop(0, jnp.sum(group_sizes > 0), group, out)


# ---------------------------------------------------------------------------- tgmm loops


def _tgmm_full_tiles(lhs_t, dout, acc, start, count, tm: int):
  """acc += lhs[rows]^T @ dout[rows] over count full tiles from `start` (lhs_t = lhs^T)."""

  def body(j, acc):
    r0 = start + j * tm
    a = lax.dynamic_slice_in_dim(lhs_t, r0, tm, axis=1)
    b = _f32(lax.dynamic_slice_in_dim(dout, r0, tm))
    return acc + jnp.dot(a, b)

  return lax.fori_loop(0, count, body, acc)


def _tgmm_tail_tiles(lhs_t, dout, acc, begin, end, tm: int):
  """acc += lhs[begin:end]^T @ dout[begin:end] in masked tiles of tm rows."""
  m = dout.shape[0]

  def body(j, acc):
    lo = begin + j * tm  # as in _gmm_tail_tiles: rows before lo are counted already
    r0 = jnp.minimum(lo, m - tm)
    keep = _row_mask(r0, tm, lo, end)
    # Mask both operands so that non-finite rows outside the group cannot leak in as NaN.
    a = jnp.where(keep[None, :], lax.dynamic_slice_in_dim(lhs_t, r0, tm, axis=1), 0)
    b = jnp.where(keep[:, None], _f32(lax.dynamic_slice_in_dim(dout, r0, tm)), 0)
    return acc + jnp.dot(a, b)

  return lax.fori_loop(0, (end - begin + tm - 1) // tm, body, acc)


def _tgmm_loop(lhs, dout, group_sizes, tiling: GmmTiling, out_dtype):
  """The xla tgmm: [M, K], [M, N] -> [G, K, N]."""
  m, k = lhs.shape
  n = dout.shape[1]
  num_groups = group_sizes.shape[0]
  out = jnp.zeros((num_groups, k, n), out_dtype)
  if m == 0:
    return out
  big, small = _tile_sizes(m, num_groups, tiling)
  starts, ends = _group_bounds(group_sizes)
  # One transpose of lhs up front keeps every tile product a plain [K, tm] @ [tm, N] matmul.
  lhs_t = _f32(lhs.T)

  def group(g, out):
    acc = jnp.zeros((k, n), jnp.float32)
    full = (ends[g] - starts[g]) // big
    acc = _tgmm_full_tiles(lhs_t, dout, acc, starts[g], full, big)
    acc = _tgmm_tail_tiles(lhs_t, dout, acc, starts[g] + full * big, ends[g], small)
    return lax.dynamic_update_index_in_dim(out, acc.astype(out_dtype), g, 0)

  return lax.fori_loop(0, num_groups, group, out)


# -------------------------------------------------------------------- custom VJP wiring


def _flat(rhs: jax.Array) -> jax.Array:
  """[G, K, *N] -> [G, K, prod(N)]."""
  return rhs.reshape(rhs.shape[0], rhs.shape[1], -1)


# rhs may be [G, K, *N]: it is flattened inside, so that the residual the backward keeps is rhs
# itself. Under a scan over layers a reshaped weight would be a new value, stacked into a
# per-layer copy of the weights; the weight as given is the scan's own slice of the params.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_xla(lhs, rhs, group_sizes, tiling):
  return _gmm_loop(lhs, _flat(rhs), group_sizes, tiling, False, jnp.result_type(lhs, rhs))


def _gmm_xla_fwd(lhs, rhs, group_sizes, tiling):
  return _gmm_xla(lhs, rhs, group_sizes, tiling), (lhs, rhs, group_sizes)


def _gmm_xla_bwd(tiling, res, dout):
  lhs, rhs, group_sizes = res
  dlhs = _gmm_loop(dout, _flat(rhs), group_sizes, tiling, True, lhs.dtype)
  drhs = _tgmm_loop(lhs, dout, group_sizes, tiling, rhs.dtype).reshape(rhs.shape)
  return dlhs, drhs, None


_gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)


# ------------------------------------------------------------------------ public ops


def _check_gmm_args(lhs, rhs, group_sizes):
  if lhs.ndim != 2 or rhs.ndim < 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm: need lhs [M, K], rhs [G, K, N...]; got {lhs.shape}, {rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],) or group_sizes.dtype != jnp.int32:
    raise ValueError(
      f"gmm: group_sizes must be int32 [G]=[{rhs.shape[0]}], got "
      f"{group_sizes.dtype}{list(group_sizes.shape)}"
    )


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  impl: str = "auto",
  tile: int | GmmTiling | gmm_pallas.BlockSizes | None = None,
) -> jax.Array:
  """Grouped matmul: each group's rows of lhs times that group's rhs.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one weight matrix per group, or [G, K, *N] with the output dims N flattened
      (row-major): e.g. a [G, K, 2, F] gate/up weight gives [M, 2F], gate columns first.
    group_sizes: [G] int32 rows per group, sum <= M.
    impl: "auto" | "xla" | "reference" | "pallas".
    tile: xla: row tiles of the loops (an int sets both); pallas: a gmm_pallas.BlockSizes.
      None takes the tuned tiles (TUNED_TILING, gmm_pallas.TUNED_BLOCK_SIZES).

  Returns:
    [M, N] (N = prod of rhs.shape[2:]) in the promoted dtype of lhs and rhs (float32
    accumulation); rows past sum(group_sizes) are zero. Differentiable in lhs and rhs.
  """
  impl = resolve_impl(impl, "gmm")
  lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
  _check_gmm_args(lhs, rhs, group_sizes)
  if impl == "reference":
    return gmm_reference(lhs, _flat(rhs), group_sizes)
  if impl == "pallas":
    return gmm_pallas.gmm(lhs, _flat(rhs), group_sizes, block_sizes=_pallas_block_sizes(tile))
  return _gmm_xla(lhs, rhs, group_sizes, _resolve_tiling(tile))


def tgmm(
  lhs: jax.Array,
  dout: jax.Array,
  group_sizes: jax.Array,
  *,
  impl: str = "auto",
  tile: int | GmmTiling | gmm_pallas.BlockSizes | None = None,
) -> jax.Array:
  """Transposed grouped matmul, the weight gradient of `gmm`.

  Args:
    lhs: [M, K] rows sorted by group.
    dout: [M, N] rows in the same order.
    group_sizes: [G] int32 rows per group, sum <= M.
    impl: "auto" | "xla" | "reference" | "pallas".
    tile: as in `gmm`.

  Returns:
    [G, K, N] in the promoted dtype of lhs and dout; out[g] = lhs_g^T @ dout_g. Only the
    reference impl is differentiable (the others are a backward pass already).
  """
  impl = resolve_impl(impl, "tgmm")
  lhs, dout, group_sizes = jnp.asarray(lhs), jnp.asarray(dout), jnp.asarray(group_sizes)
  if impl == "reference":
    return tgmm_reference(lhs, dout, group_sizes)
  if impl == "pallas":
    return gmm_pallas.tgmm(lhs, dout, group_sizes, block_sizes=_pallas_block_sizes(tile))
  out_dtype = jnp.result_type(lhs, dout)
  return _tgmm_loop(lhs, dout, group_sizes, _resolve_tiling(tile), out_dtype)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """The definition: for each group, a dense matmul of all rows, kept on the group's rows."""
  starts, ends = _group_bounds(group_sizes)
  rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)

  def step(out, g):
    mask = (rows >= starts[g]) & (rows < ends[g])
    y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None], y, out), None

  init = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  out, _ = lax.scan(step, init, jnp.arange(rhs.shape[0]))
  return out.astype(jnp.result_type(lhs, rhs))


def tgmm_reference(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """The definition: out[g] = (lhs with rows outside group g zeroed)^T @ dout."""
  starts, ends = _group_bounds(group_sizes)
  rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)

  def one_group(g):
    mask = (rows >= starts[g]) & (rows < ends[g])
    masked = jnp.where(mask[:, None], lhs, 0)
    return jnp.dot(masked.T, dout, preferred_element_type=jnp.float32)

  out = lax.map(one_group, jnp.arange(group_sizes.shape[0]))
  return out.astype(jnp.result_type(lhs, dout))


def ragged_dot_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """gmm through XLA's lax.ragged_dot (the baseline the xla impl is measured against)."""
  out = lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(lhs, rhs))
