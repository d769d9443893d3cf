"""Grouped matmul (gmm) and its transpose (tgmm) as Pallas kernels: Mosaic TPU and Triton GPU.

Dims: M rows, K contraction, N output columns, G groups; tm, tk, tn are the tiles of M, K, N.

Group g owns the rows [o_g, o_g + s_g) of lhs, o_g = s_0 + ... + s_{g-1}, s = group_sizes:
  gmm(lhs [M, K], rhs [G, K, N], s [G]) -> out [M, N]
      out[r] = lhs[r] @ rhs[g] for r in group g; rows >= sum(s) are zero.
  tgmm(lhs [M, K], dout [M, N], s [G]) -> [G, K, N]
      tgmm[g] = lhs[rows of g]^T @ dout[rows of g]; zero for an empty group.
  VJP of gmm: dlhs = gmm(dout, rhs^T), drhs = tgmm(lhs, dout); rhs^T is never materialized, the
  kernels read rhs [G, K, N] in place as [G, N, K] tiles (`transpose_rhs`).
Products accumulate in float32; gmm returns the promoted dtype of lhs and rhs (dlhs the dtype of
lhs, drhs that of rhs), as the xla impl in gmm.py does. The references (`gmm_reference`,
`tgmm_reference`) live in gmm.py, the dispatch module.

Mosaic TPU kernels (megablox's design, jax/experimental/pallas/ops/tpu/megablox, rewritten):
  A row tile that a group boundary cuts is visited once per group, with a row mask on the store.
  `_visit_schedule` lists the visits (group id, row tile) in jnp; they reach the index maps as
  scalar-prefetched SMEM arrays, so each grid step DMAs the right lhs tile and group weights.
  gmm grid (N/tn, V, K/tk): acc [tm, tn] f32 in VMEM sums over the K tiles, then the rows of the
  visited group are stored. An extra "sentinel" group owns the rows past sum(s): its visits store
  zeros, so every output row is written exactly once and the output needs no zero-fill pass.
  tgmm grid (K/tk, N/tn, V): acc [tk, tn] sums masked tile products over a group's visits and is
  stored at its last one; an empty group gets one visit, which stores zeros.
Triton GPU kernels (GPU programs run in parallel, so no output tile may be shared between them):
  gmm grid (M/tm, N/tn): a program loops over the groups that meet its row tile, accumulating
  (lhs tile masked to the group's rows) @ rhs[g] over K, and stores the tile once.
  tgmm grid (K/tk, N/tn, G): a program loops over its group's row tiles.
Mosaic GPU, Pallas' default GPU backend in jax 0.10.2, is not used: its pallas_call path is
deprecated (for plgpu.kernel), has no scalar prefetch to pick a group's weight tile in an index
map, and copies whole-array operands into shared memory (the Triton kernels' form fails there:
"exceeds available shared memory", "async copies only support <= 256 elements per dim").

Operands whose M, K or N is not a multiple of the tile are zero-padded (a copy), so pick tiles
that divide K and N (`BlockSizes.fit` shrinks K and N tiles to divisors where it can).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

KERNELS = ("auto", "mosaic_tpu", "triton")
_KERNEL_PLATFORM = {"mosaic_tpu": "tpu", "triton": "gpu"}
_LANES = 128  # TPU vreg lanes: the minor tile dim of every VMEM block
_SUBLANES = 8  # TPU vreg sublanes of 32 bits: 8 rows of f32, 16 of bf16 (packed in pairs)
_TRITON_MIN_DIM = 16  # tl.dot needs every dim >= 16 (and Triton blocks are powers of 2)
_MIN_ROWS = 16  # the smallest row tile `fit` makes: bf16 rows pack in 16s on TPU; tl.dot's min


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _sublanes(dtype) -> int:
  return _SUBLANES * 4 // jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of a gmm [M, K] x [K, N] (for tgmm: M is the contraction, [K, N] the output tile).

  Attributes:
    tm: rows of lhs per tile; a group boundary inside a tile costs one extra tile visit.
    tk: contraction (K) tile of gmm; output rows of tgmm.
    tn: output columns per tile.
  """

  tm: int
  tk: int
  tn: int

  def __post_init__(self):
    sizes = (self.tm, self.tk, self.tn)
    if not all(isinstance(t, int) and t > 0 for t in sizes):
      raise ValueError(f"BlockSizes must be positive ints, got {self}")

  def check(self, platform: str, dtype) -> None:
    """Raises ValueError if these tiles cannot lower on `platform` for operands of `dtype`.

    Interpret mode runs any tile shape, so the wrappers call this for the platform the kernel is
    written for, and CPU tests catch tiles that would fail to compile on the device.

    Args:
      platform: "tpu" (Mosaic), "gpu" (Triton) or "cpu" (interpret only: no constraint).
      dtype: the narrowest operand dtype (it sets the TPU row packing).
    """
    if platform == "tpu":
      rows = _sublanes(dtype)
      for name, t, m in (("tm", self.tm, rows), ("tk", self.tk, _LANES), ("tn", self.tn, _LANES)):
        if t % m:
          raise ValueError(
            f"{self} on tpu with {jnp.dtype(dtype).name}: {name}={t} must be a multiple of {m} "
            f"(VMEM blocks are ({rows}, {_LANES}) tiles)"
          )
    elif platform == "gpu":
      for name in ("tm", "tk", "tn"):
        t = getattr(self, name)
        if not _is_pow2(t) or t < _TRITON_MIN_DIM:
          raise ValueError(
            f"{self} on gpu: {name}={t} must be a power of 2 >= {_TRITON_MIN_DIM} (Triton blocks)"
          )
    elif platform != "cpu":
      raise ValueError(f"BlockSizes.check: unknown platform {platform!r}")

  def fit(self, m: int, k: int, n: int, platform: str) -> BlockSizes:
    """Shrinks tiles to a small problem [M, K] x [K, N], keeping them legal on `platform`."""
    lanes = _LANES if platform == "tpu" else _TRITON_MIN_DIM
    return BlockSizes(
      tm=_fit_tile(self.tm, m, _MIN_ROWS, divide=False),
      tk=_fit_tile(self.tk, k, lanes, divide=True),
      tn=_fit_tile(self.tn, n, lanes, divide=True),
    )


def _fit_tile(t: int, dim: int, floor: int, divide: bool) -> int:
  t = min(t, max(floor, pl.next_power_of_2(dim)))
  # A K or N tile that does not divide the dim pads a whole operand (weights included); a
  # smaller legal tile that divides it costs no copy. M tiles are not halved to divide M: M
  # follows the data, and tiny row tiles would waste the matmul units.
  while divide and dim % t and t % 2 == 0 and (t // 2) % floor == 0:
    t //= 2
  return t


# Block sizes by platform. Not tuned yet (no TPU or GPU in the sessions that wrote this):
# tpu: 512^3 blocks take ~7 MiB of VMEM with f32 operands double-buffered, under the 16 MiB
# default scoped limit of v4/v5e/v5p; gpu: Triton's usual 64x64 tiles for 4 warps; cpu: interpret mode of the TPU kernel,
# where fewer grid steps are faster.
TUNED_BLOCK_SIZES = types.MappingProxyType(
  {
    "tpu": BlockSizes(tm=512, tk=512, tn=512),
    "gpu": BlockSizes(tm=64, tk=32, tn=64),
    "cpu": BlockSizes(tm=128, tk=128, tn=128),
  }
)
_TRITON_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)


# ------------------------------------------------------------------ Mosaic TPU kernels


def _dot(a, b, dims, dtype):
  a, b = a.astype(dtype), b.astype(dtype)
  return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _nt(transpose_rhs: bool):
  """Contracting dims of lhs [tm, tk] with an rhs tile [tk, tn], or [tn, tk] if transposed."""
  return ((1,), (1,)) if transpose_rhs else ((1,), (0,))


def _gmm_tpu_kernel(
  offsets, group_ids, tile_ids, num_visits, lhs_ref, rhs_ref, out_ref, acc_ref, *, transpose_rhs
):
  """One (n tile, visit, k tile) step: acc += lhs tile @ rhs tile; store the group's rows."""
  v, kk = pl.program_id(1), pl.program_id(2)
  g, num_groups = group_ids[v], offsets.shape[0] - 2  # offsets [G + 2] include the sentinel's
  live = v < num_visits[0]  # trailing grid steps past the schedule do nothing

  @pl.when(kk == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(live & (g < num_groups))  # the sentinel group's acc stays zero
  def _accumulate():
    dtype = jnp.result_type(lhs_ref.dtype, rhs_ref.dtype)
    acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], _nt(transpose_rhs), dtype)

  @pl.when(live & (kk == pl.num_programs(2) - 1))
  def _store():
    rows = tile_ids[v] * out_ref.shape[0] + lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
    mine = (rows >= offsets[g]) & (rows < offsets[g + 1])
    # Rows of other groups keep what their own visit of this tile stored (the block stays in
    # VMEM across consecutive visits). Select in f32, as megablox does: older TPUs have no bf16
    # VPU.
    kept = out_ref[...].astype(jnp.float32)
    out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)


def _tgmm_tpu_kernel(offsets, group_ids, tile_ids, num_visits, lhs_ref, dout_ref, out_ref, acc_ref):
  """One (k tile, n tile, visit) step: acc += (masked lhs tile)^T @ (masked dout tile)."""
  v, last = pl.program_id(2), pl.num_programs(2) - 1
  g, count = group_ids[v], num_visits[0]
  live = v < count
  first_visit = (v == 0) | (group_ids[jnp.maximum(v - 1, 0)] != g)
  last_visit = (v == count - 1) | (group_ids[jnp.minimum(v + 1, last)] != g)
  begin, end = offsets[g], offsets[g + 1]

  @pl.when(live & first_visit)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(live & (end > begin))
  def _accumulate():
    def rows_of_group(x):  # zero rows outside the group, so that NaN/Inf there cannot leak in
      rows = tile_ids[v] * x.shape[0] + lax.broadcasted_iota(jnp.int32, x.shape, 0)
      return jnp.where((rows >= begin) & (rows < end), x.astype(jnp.float32), 0)

    # Transpose in f32 before the dot, as megablox does: Mosaic transposes 32-bit tiles natively.
    lhs_t = rows_of_group(lhs_ref[...]).T
    dtype = jnp.result_type(lhs_ref.dtype, dout_ref.dtype)
    acc_ref[...] += _dot(lhs_t, rows_of_group(dout_ref[...]), ((1,), (0,)), dtype)

  @pl.when(live & last_visit)
  def _store():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


# ------------------------------------------------------------------- Triton GPU kernels


def _gmm_gpu_kernel(offsets, group_lo, group_hi, lhs_ref, rhs_ref, out_ref, *, tk, transpose_rhs):
  """Program (i, j): out tile (i, j) = sum over the groups g meeting row tile i of (the rows of
  tile i in g) @ rhs[g], accumulated over K tiles. lhs_ref and rhs_ref are whole arrays."""
  i, j = pl.program_id(0), pl.program_id(1)
  tm, tn = out_ref.shape
  rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
  rows_i, cols_j = pl.ds(i * tm, tm), pl.ds(j * tn, tn)
  dtype = jnp.result_type(lhs_ref.dtype, rhs_ref.dtype)

  def one_group(g, acc):
    mine = (rows >= offsets[g]) & (rows < offsets[g + 1])

    def k_step(kk, acc):
      ks = pl.ds(kk * tk, tk)
      a = jnp.where(mine, lhs_ref[rows_i, ks], 0)
      b = rhs_ref[g, cols_j, ks] if transpose_rhs else rhs_ref[g, ks, cols_j]
      return acc + _dot(a, b, _nt(transpose_rhs), dtype)

    def k_loop():
      return lax.fori_loop(0, lhs_ref.shape[1] // tk, k_step, acc)

    return lax.cond(offsets[g + 1] > offsets[g], k_loop, lambda: acc)  # skip empty groups

  acc = lax.fori_loop(group_lo[i], group_hi[i], one_group, jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)  # no group past sum(s): zeros


def _tgmm_gpu_kernel(offsets, lhs_ref, dout_ref, out_ref, *, tm):
  """Program (k, n, g): out[g] tile (k, n) = sum over g's row tiles of masked lhs^T @ dout."""
  kk, j, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tk, tn = out_ref.shape
  begin, end = offsets[g], offsets[g + 1]
  dtype = jnp.result_type(lhs_ref.dtype, dout_ref.dtype)

  def row_tile(t, acc):
    def rows_of_group(x):
      rows = t * tm + lax.broadcasted_iota(jnp.int32, x.shape, 0)
      return jnp.where((rows >= begin) & (rows < end), x, 0)

    a = rows_of_group(lhs_ref[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)])
    b = rows_of_group(dout_ref[pl.ds(t * tm, tm), pl.ds(j * tn, tn)])
    return acc + _dot(a, b, ((0,), (0,)), dtype)

  first = begin // tm
  stop = jnp.where(end > begin, pl.cdiv(end, tm), first)  # an empty group: no tiles, zeros
  acc = lax.fori_loop(first, stop, row_tile, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


# ------------------------------------------------------------- pallas_call wrappers


def _visit_schedule(group_sizes, m: int, m_pad: int, tm: int, for_tgmm: bool):
  """The Mosaic kernels' visits: the group and row tile of each step of the visit grid axis.

  A nonempty group visits the row tiles from the one holding its first row to the one holding
  its last. gmm adds a sentinel group G owning rows [sum(s), m_pad); tgmm gives it no visits and
  gives an empty group one (to store zeros). There are at most M/tm + G visits; the grid has
  that many steps, and steps past the schedule repeat the last visit (same blocks: no DMA).

  Args:
    group_sizes: [G] int32.
    m: rows of lhs before padding; groups are clipped to it.
    m_pad: rows after padding, a multiple of tm.
    tm: row tile.
    for_tgmm: the schedule of tgmm instead of gmm.

  Returns:
    offsets [G + 2] (group g owns rows [offsets[g], offsets[g + 1])), group_ids [M/tm + G],
    tile_ids [M/tm + G], num_visits [1]; int32.
  """
  num_groups, tiles_m = group_sizes.shape[0], m_pad // tm
  ends = jnp.minimum(jnp.cumsum(group_sizes, dtype=jnp.int32), m)
  ends = jnp.concatenate([ends, jnp.full((1,), m_pad, jnp.int32)])
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  first = offsets[:-1] // tm
  nonempty = ends > offsets[:-1]
  visits = jnp.where(nonempty, (ends - 1) // tm - first + 1, 0)
  if for_tgmm:
    visits = jnp.where(nonempty, visits, 1).at[num_groups].set(0)
  visit_ends = jnp.cumsum(visits, dtype=jnp.int32)
  num_visits = visit_ends[-1]
  step = jnp.minimum(jnp.arange(tiles_m + num_groups, dtype=jnp.int32), num_visits - 1)
  group_ids = jnp.searchsorted(visit_ends, step, side="right").astype(jnp.int32)
  tile_ids = first[group_ids] + step - (visit_ends - visits)[group_ids]
  # An empty group that starts at row m_pad has no tile of its own; any tile will do.
  return offsets, group_ids, jnp.minimum(tile_ids, tiles_m - 1), num_visits[None]


def _mosaic_params():
  # Only the N (gmm) or K (tgmm) tile axis is parallel: the visit axis carries the output block
  # and accumulator from step to step.
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"))


def _gmm_tpu_call(lhs, rhs, group_sizes, m, bs, *, transpose_rhs, out_dtype, interpret):
  """Mosaic gmm of padded operands: lhs [Mp, Kp], rhs [G, Kp, Np] (or [G, Np, Kp]) -> [Mp, Np]."""
  (m_pad, k), num_groups = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  schedule = _visit_schedule(group_sizes, m, m_pad, bs.tm, for_tgmm=False)

  # Index maps get the grid indices (n tile j, visit v, k tile kk), then the schedule.
  def rhs_map(j, v, kk, offsets, group_ids, tile_ids, num_visits):
    g = jnp.minimum(group_ids[v], num_groups - 1)  # the sentinel's weights are never used
    return (g, j, kk) if transpose_rhs else (g, kk, j)

  rhs_block = (pl.squeezed, bs.tn, bs.tk) if transpose_rhs else (pl.squeezed, bs.tk, bs.tn)
  return pl.pallas_call(
    functools.partial(_gmm_tpu_kernel, transpose_rhs=transpose_rhs),
    out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(schedule),
      grid=(n // bs.tn, schedule[1].shape[0], k // bs.tk),
      in_specs=[
        pl.BlockSpec((bs.tm, bs.tk), lambda j, v, kk, _, gids, tids, nv: (tids[v], kk)),
        pl.BlockSpec(rhs_block, rhs_map),
      ],
      out_specs=pl.BlockSpec((bs.tm, bs.tn), lambda j, v, kk, _, gids, tids, nv: (tids[v], j)),
      scratch_shapes=[pltpu.VMEM((bs.tm, bs.tn), jnp.float32)],
    ),
    compiler_params=_mosaic_params(),
    interpret=interpret,
    name="gmm_mosaic",
  )(*schedule, lhs, rhs)


def _tgmm_tpu_call(lhs, dout, group_sizes, m, bs, *, out_dtype, interpret):
  """Mosaic tgmm of padded operands: lhs [Mp, Kp], dout [Mp, Np] -> [G, Kp, Np]."""
  (m_pad, k), n, num_groups = lhs.shape, dout.shape[1], group_sizes.shape[0]
  schedule = _visit_schedule(group_sizes, m, m_pad, bs.tm, for_tgmm=True)
  # Index maps get the grid indices (k tile kk, n tile j, visit v), then the schedule.
  return pl.pallas_call(
    _tgmm_tpu_kernel,
    out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(schedule),
      grid=(k // bs.tk, n // bs.tn, schedule[1].shape[0]),
      in_specs=[
        pl.BlockSpec((bs.tm, bs.tk), lambda kk, j, v, _, gids, tids, nv: (tids[v], kk)),
        pl.BlockSpec((bs.tm, bs.tn), lambda kk, j, v, _, gids, tids, nv: (tids[v], j)),
      ],
      out_specs=pl.BlockSpec(
        (pl.squeezed, bs.tk, bs.tn), lambda kk, j, v, _, gids, tids, nv: (gids[v], kk, j)
      ),
      scratch_shapes=[pltpu.VMEM((bs.tk, bs.tn), jnp.float32)],
    ),
    compiler_params=_mosaic_params(),
    interpret=interpret,
    name="tgmm_mosaic",
  )(*schedule, lhs, dout)


def _group_offsets(group_sizes, m: int):
  """[G + 1] int32: group g owns rows [offsets[g], offsets[g + 1]), clipped to m."""
  ends = jnp.minimum(jnp.cumsum(group_sizes, dtype=jnp.int32), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def _gmm_gpu_call(lhs, rhs, group_sizes, m, bs, *, transpose_rhs, out_dtype, interpret):
  """Triton gmm of padded operands, as `_gmm_tpu_call`."""
  (m_pad, _), num_groups = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  offsets = _group_offsets(group_sizes, m)
  # Row tile i meets groups [lo, hi): the group holding its first row up to the one holding its
  # last; searchsorted returns G for rows past sum(s), which leaves such tiles with no groups.
  first_rows = jnp.arange(0, m_pad, bs.tm, dtype=jnp.int32)
  group_lo = jnp.searchsorted(offsets[1:], first_rows, side="right").astype(jnp.int32)
  last_group = jnp.searchsorted(offsets[1:], first_rows + bs.tm - 1, side="right")
  group_hi = jnp.minimum(last_group + 1, num_groups).astype(jnp.int32)
  return pl.pallas_call(
    functools.partial(_gmm_gpu_kernel, tk=bs.tk, transpose_rhs=transpose_rhs),
    out_shape=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
    grid=(m_pad // bs.tm, n // bs.tn),
    in_specs=[pl.no_block_spec] * 5,  # whole arrays: the kernel slices them itself
    out_specs=pl.BlockSpec((bs.tm, bs.tn), lambda i, j: (i, j)),
    compiler_params=_TRITON_PARAMS,
    interpret=interpret,
    name="gmm_triton",
  )(offsets, group_lo, group_hi, lhs, rhs)


def _tgmm_gpu_call(lhs, dout, group_sizes, m, bs, *, out_dtype, interpret):
  """Triton tgmm of padded operands, as `_tgmm_tpu_call`."""
  k, n, num_groups = lhs.shape[1], dout.shape[1], group_sizes.shape[0]
  return pl.pallas_call(
    functools.partial(_tgmm_gpu_kernel, tm=bs.tm),
    out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
    grid=(k // bs.tk, n // bs.tn, num_groups),
    in_specs=[pl.no_block_spec] * 3,
    out_specs=pl.BlockSpec((pl.squeezed, bs.tk, bs.tn), lambda kk, j, g: (g, kk, j)),
    compiler_params=_TRITON_PARAMS,
    interpret=interpret,
    name="tgmm_triton",
  )(_group_offsets(group_sizes, m), lhs, dout)


def _pad(x, shape):
  widths = [(0, want - have) for have, want in zip(x.shape, shape, strict=True)]
  return jnp.pad(x, widths) if any(hi for _, hi in widths) else x


def _fitted(block_sizes, kernel, m, k, n, *dtypes):
  """Tiles fitted to the problem and checked for the kernel's platform; padded (M, K, N)."""
  platform = _KERNEL_PLATFORM[kernel]
  bs = block_sizes.fit(m, k, n, platform)
  bs.check(platform, min(dtypes, key=lambda d: jnp.dtype(d).itemsize))
  return bs, tuple(pl.cdiv(d, t) * t for d, t in ((m, bs.tm), (k, bs.tk), (n, bs.tn)))


def _gmm_kernel_call(
  lhs, rhs, group_sizes, *, block_sizes, kernel, transpose_rhs, out_dtype, interpret
):
  """gmm by one kernel: fits, checks and pads tiles, runs, and crops the padding."""
  (m, k), num_groups = lhs.shape, rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((m, n), out_dtype)
  bs, (mp, kp, np_) = _fitted(block_sizes, kernel, m, k, n, lhs.dtype, rhs.dtype, out_dtype)
  lhs = _pad(lhs, (mp, kp))
  rhs = _pad(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
  call = _gmm_tpu_call if kernel == "mosaic_tpu" else _gmm_gpu_call
  kwargs = dict(transpose_rhs=transpose_rhs, out_dtype=out_dtype, interpret=interpret)
  out = call(lhs, rhs, group_sizes, m, bs, **kwargs)
  return out[:m, :n] if (mp, np_) != (m, n) else out


def _tgmm_kernel_call(lhs, dout, group_sizes, *, block_sizes, kernel, out_dtype, interpret):
  """tgmm by one kernel, as `_gmm_kernel_call`."""
  (m, k), n, num_groups = lhs.shape, dout.shape[1], group_sizes.shape[0]
  if 0 in (m, k, n, num_groups):
    return jnp.zeros((num_groups, k, n), out_dtype)
  bs, (mp, kp, np_) = _fitted(block_sizes, kernel, m, k, n, lhs.dtype, dout.dtype, out_dtype)
  lhs, dout = _pad(lhs, (mp, kp)), _pad(dout, (mp, np_))
  call = _tgmm_tpu_call if kernel == "mosaic_tpu" else _tgmm_gpu_call
  out = call(lhs, dout, group_sizes, m, bs, out_dtype=out_dtype, interpret=interpret)
  return out[:, :k, :n] if (kp, np_) != (k, n) else out


# ------------------------------------------------------------------- platform choice


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which kernel runs where, with which tiles (hashable: a nondiff argument of custom_vjp)."""

  block_sizes: tuple[tuple[str, BlockSizes], ...]  # by platform: "tpu", "gpu", "cpu"
  kernel: str
  interpret: bool | None


def _make_plan(block_sizes, kernel: str, interpret: bool | None) -> _Plan:
  if kernel not in KERNELS:
    raise ValueError(f"gmm_pallas: unknown kernel={kernel!r}; allowed: {', '.join(KERNELS)}")
  sizes = dict(TUNED_BLOCK_SIZES)
  if isinstance(block_sizes, BlockSizes):
    sizes = dict.fromkeys(sizes, block_sizes)
  elif block_sizes is not None:
    if unknown := set(block_sizes) - set(sizes):
      raise ValueError(f"gmm_pallas: block_sizes keys must be in {sorted(sizes)}, got {unknown}")
    sizes.update(block_sizes)
  return _Plan(tuple(sorted(sizes.items())), kernel, interpret)


def _run(plan: _Plan, kernel_call: Callable, *args, **static):
  """Runs kernel_call(*args, kernel=..., block_sizes=..., interpret=..., **static), the kernel
  and tiles picked per platform.

  Both the kernel and interpret mode are chosen when lowering (`lax.platform_dependent`), never
  from the process's default backend: `jax.export(..., platforms=("tpu",))` on a CPU host then
  holds the Mosaic kernel, and the same function run on CPU the interpret-mode branch.
  """
  sizes = dict(plan.block_sizes)

  def make(kernel, block_sizes, interpret):
    return functools.partial(
      kernel_call, kernel=kernel, block_sizes=block_sizes, interpret=interpret, **static
    )

  on_cpu = plan.interpret is not False  # CPU runs Pallas only in interpret mode
  on_device = bool(plan.interpret)
  if plan.kernel == "auto":
    return lax.platform_dependent(
      *args,
      cpu=make("mosaic_tpu", sizes["cpu"], on_cpu),
      tpu=make("mosaic_tpu", sizes["tpu"], on_device),
      cuda=make("triton", sizes["gpu"], on_device),
      rocm=make("triton", sizes["gpu"], on_device),
    )
  block_sizes = sizes[_KERNEL_PLATFORM[plan.kernel]]
  if plan.interpret is not None:
    return make(plan.kernel, block_sizes, plan.interpret)(*args)
  return lax.platform_dependent(
    *args, cpu=make(plan.kernel, block_sizes, True), default=make(plan.kernel, block_sizes, False)
  )


# -------------------------------------------------------------------- custom VJP wiring


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, plan):
  dtype = jnp.result_type(lhs, rhs)
  return _run(plan, _gmm_kernel_call, lhs, rhs, group_sizes, transpose_rhs=False, out_dtype=dtype)


def _gmm_fwd(lhs, rhs, group_sizes, plan):
  return _gmm(lhs, rhs, group_sizes, plan), (lhs, rhs, group_sizes)


def _gmm_bwd(plan, res, dout):
  lhs, rhs, group_sizes = res
  dlhs = _run(
    plan, _gmm_kernel_call, dout, rhs, group_sizes, transpose_rhs=True, out_dtype=lhs.dtype
  )
  drhs = _run(plan, _tgmm_kernel_call, lhs, dout, group_sizes, out_dtype=rhs.dtype)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


BlockSizesArg = BlockSizes | Mapping[str, BlockSizes] | None


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  block_sizes: BlockSizesArg = None,
  kernel: str = "auto",
  interpret: bool | None = None,
) -> jax.Array:
  """Grouped matmul by the Pallas kernels; differentiable in lhs and rhs.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one weight matrix per group.
    group_sizes: [G] int32 rows per group, sum <= M.
    block_sizes: tiles for every platform, or a mapping {"tpu" | "gpu" | "cpu": BlockSizes} over
      TUNED_BLOCK_SIZES. With kernel="auto" every platform's kernel is traced, so a single
      BlockSizes must suit both TPU and GPU (or give a mapping).
    kernel: "auto" (Mosaic on TPU, Triton on GPU, the Mosaic kernel interpreted on CPU),
      "mosaic_tpu" or "triton" (that kernel everywhere; tests interpret both).
    interpret: None: interpret mode exactly when lowering for CPU; True: always; False: never
      (CPU then fails to lower).

  Returns:
    [M, N] in the promoted dtype of lhs and rhs; rows past sum(group_sizes) are zero.
  """
  return _gmm(lhs, rhs, group_sizes, _make_plan(block_sizes, kernel, interpret))


def tgmm(
  lhs: jax.Array,
  dout: jax.Array,
  group_sizes: jax.Array,
  *,
  block_sizes: BlockSizesArg = None,
  kernel: str = "auto",
  interpret: bool | None = None,
) -> jax.Array:
  """Transposed grouped matmul (the weight gradient of `gmm`) by the Pallas kernels.

  Args:
    lhs: [M, K] rows sorted by group.
    dout: [M, N] rows in the same order.
    group_sizes: [G] int32 rows per group, sum <= M.
    block_sizes, kernel, interpret: as in `gmm`.

  Returns:
    [G, K, N] in the promoted dtype of lhs and dout; out[g] = lhs_g^T @ dout_g, zero for an
    empty group. Not differentiable (it is a backward pass already).
  """
  plan = _make_plan(block_sizes, kernel, interpret)
  out_dtype = jnp.result_type(lhs, dout)
  return _run(plan, _tgmm_kernel_call, lhs, dout, group_sizes, out_dtype=out_dtype)
