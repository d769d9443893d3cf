"""Pallas kernels of the token dispatch: expert-sorted row order, row gather, weighted combine.

Dims: T tokens, K slots per token, R = T*K pairs (sorted rows), D row width, E experts,
Ep = E rounded up to a power of two; Bp pairs, Br rows, Bt tokens, Bc columns per block.

Pair (t, k) is entry p = t*K + k of experts.reshape(-1). Its destination (sorted) row is
  inv[p] = start[e] + #{q < p : id_q == e},   e = id_p,   start[e] = sum_{e' < e} sizes[e'],
which is the stable argsort: order = inv^-1. Three kernel families compute the dispatch:
  metadata  histogram: counts[b, e] = #{p in pair block b : id_p == e}                [nb, Ep]
            (jnp, tiny: sizes = sum_b counts; base[b, e] = start[e] + sum_{b' < b} counts[b', e])
            rank:      inv[p] = base[b, id_p] + #{q < p in block b : id_q == id_p}      [R]
            Both are one body on every platform: per-block compares ([Bp, Bp] and [Bp, Ep])
            reduced in float32 (Mosaic TPU reduces floats only; counts < 2^24 are exact).
  gather    out[i] = x[src[i]] * scale[i];  dots[i] = <x[src[i]], y[i]>    (scale, y optional)
            permute forward: src = order // K. unpermute backward: src = order // K over dout,
            scale = weights.flat[order] gives dy_sorted, y = y_sorted gives the dweights dots.
  combine   out[t] = sum_k w[t, k] * y[slots[t, k]], accumulated in float32
            unpermute forward: slots = inv.reshape(T, K). permute backward: w = 1 over dx_sorted.
So each op's VJP is a gather through the other permutation, built from the same two kernels, as
the xla impl does; no scatter-add anywhere. permute.py holds that custom_vjp wiring, the
per-platform dispatch and the references.

Backends, chosen when lowering (lax.platform_dependent), never from the default backend:
  tpu   Mosaic TPU. The gather and the combine keep x in HBM (memory_space ANY), read a block
        of row indices into SMEM, and start one row DMA per index into the VMEM output block
        (gather) or a [K, Bt, D] scratch (combine), then wait for all of them: Br or Bt*K DMAs
        in flight per grid step. All grids are "parallel" (no state crosses steps).
  gpu   Triton (`pallas.triton.CompilerParams`): pointer gathers x[src[:, None], cols] with
        masks, a loop over column chunks of Bc. jax 0.10.2's default GPU backend, Mosaic GPU,
        has no vector gather and deprecates pl.pallas_call. The custom call is
        `__gpu$xla.gpu.triton`, which jax.export serialises only with that safety check off.
  cpu   interpret mode. impl="pallas" runs the TPU bodies there; every wrapper also takes
        backend="gpu" with interpret=True, so the tests run the Triton bodies on CPU too.
The index arrays (int32, R entries) are padded to whole blocks in jnp; the data arrays are not.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Blocks of the dispatch kernels; all powers of two (Triton tensor shapes).

  Attributes:
    rows: Br, sorted rows per grid step of the gather (TPU: row DMAs in flight). The output
      block is [Br, D]: TPU needs Br to be a multiple of 8 rows (32-bit), 16 (16-bit) or 32
      (8-bit); `check_dtype` enforces it per array.
    tokens: Bt, tokens per grid step of the combine ([Bt, D] output, Bt*K row DMAs on TPU);
      same sublane rule as rows.
    pairs: Bp, pairs per grid step of the metadata kernels. The ids enter both as a [Bp, 1]
      column and a [1, Bp] row block, so Bp is a multiple of 128 (TPU lanes).
    cols: Bc, columns per inner step of the Triton gather and combine (unused on TPU).
  """

  rows: int = 64
  tokens: int = 16
  pairs: int = 256
  cols: int = 256

  def __post_init__(self):
    for name in ("rows", "tokens", "pairs", "cols"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got {v!r}")
    if self.rows < 8 or self.tokens < 8:
      raise ValueError(f"BlockSizes rows and tokens must be >= 8 (TPU sublanes), got {self}")
    if self.pairs < 128:
      raise ValueError(f"BlockSizes.pairs must be >= 128 (TPU lanes), got {self.pairs}")

  def check_dtype(self, dtype) -> None:
    """Raises if rows/tokens are not whole TPU sublane tiles for `dtype` (8 rows of 32 bits)."""
    tile = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    if self.rows % tile or self.tokens % tile:
      raise ValueError(
        f"BlockSizes rows={self.rows}, tokens={self.tokens}: {jnp.dtype(dtype).name} blocks "
        f"need multiples of {tile} rows (TPU tile)"
      )


# Per lowering platform. Not measured yet (no TPU/GPU here). TPU: VMEM holds the [Br, D]
# output and y blocks double-buffered, and the combine's [K, Bt, D] scratch (D=7168 fp32:
# 7.3 MiB and 3.7 MiB). GPU: [16, 256] register tiles. CPU: interpret mode, fewer steps.
TUNED_BLOCK_SIZES = types.MappingProxyType(
  {
    "tpu": BlockSizes(rows=64, tokens=16, pairs=256),
    "gpu": BlockSizes(rows=16, tokens=16, pairs=128, cols=256),
    "cpu": BlockSizes(rows=64, tokens=32, pairs=256, cols=256),
  }
)


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _pad_to(a: jax.Array, n: int, value=0) -> jax.Array:
  return jnp.pad(a, (0, n - a.shape[0]), constant_values=value)


def _check_backend(backend: str) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- metadata kernels


def _histogram_kernel(ids_ref, counts_ref):
  """ids [Bp, 1] -> counts [1, Ep] of this block (padding ids are -1: counted nowhere)."""
  ids = ids_ref[...]
  experts = lax.broadcasted_iota(jnp.int32, (ids.shape[0], counts_ref.shape[-1]), 1)
  counts_ref[...] = jnp.sum(jnp.where(ids == experts, 1.0, 0.0), axis=0, keepdims=True)


def _rank_kernel(ids_col_ref, ids_row_ref, base_ref, dest_ref):
  """ids as [Bp, 1] and [1, Bp], base [1, Ep] -> dest [Bp, 1] = base[id] + rank in block."""
  ids, ids_t = ids_col_ref[...], ids_row_ref[...]
  bp, ep = ids.shape[0], base_ref.shape[-1]
  p = lax.broadcasted_iota(jnp.int32, (bp, bp), 0)
  q = lax.broadcasted_iota(jnp.int32, (bp, bp), 1)
  rank = jnp.sum(jnp.where((ids == ids_t) & (q < p), 1.0, 0.0), axis=1, keepdims=True)
  hit = ids == lax.broadcasted_iota(jnp.int32, (bp, ep), 1)
  start = jnp.sum(jnp.where(hit, base_ref[...].astype(jnp.float32), 0.0), axis=1, keepdims=True)
  dest_ref[...] = (start + rank).astype(jnp.int32)


# ----------------------------------------------------------------------------- gather kernels


def _gather_tpu_kernel(src_ref, *refs, scaled: bool, dotted: bool):
  """One block of Br sorted rows: DMA x[src] rows from HBM, then scale / dot in VMEM.

  Refs: src [1, Br] (SMEM), [scale [Br, 1]], [y [Br, D]], x [N, D] (HBM), out [Br, D],
  [dots [Br, 1]], DMA semaphore.
  """
  it = iter(refs)
  scale_ref = next(it) if scaled else None
  y_ref = next(it) if dotted else None
  x_hbm, out_ref = next(it), next(it)
  dots_ref = next(it) if dotted else None
  sem = next(it)
  rows = out_ref.shape[0]

  def copy(j):
    return pltpu.make_async_copy(x_hbm.at[pl.ds(src_ref[0, j], 1)], out_ref.at[pl.ds(j, 1)], sem)

  # All row copies go out before the first wait, so they overlap; each wait takes one row's
  # bytes off the shared semaphore, so the order of completion does not matter.
  @pl.loop(0, rows)
  def _(j):
    copy(j).start()

  @pl.loop(0, rows)
  def _(j):
    copy(j).wait()

  if scaled or dotted:
    g = out_ref[...].astype(jnp.float32)
    if dotted:
      dots_ref[...] = jnp.sum(g * y_ref[...].astype(jnp.float32), axis=1, keepdims=True)
    if scaled:
      out_ref[...] = (g * scale_ref[...]).astype(out_ref.dtype)


def _gather_gpu_kernel(
  src_ref, *refs, rows: int, cols: int, num_rows: int, scaled: bool, dotted: bool
):
  """One block of Br sorted rows as Triton pointer gathers, Bc columns at a time.

  Refs (whole arrays): src [R padded to Br] int32, [scale [R] f32], [y [R, D]], x [N, D],
  out [R, D], [dots [R] f32].
  """
  it = iter(refs)
  scale_ref = next(it) if scaled else None
  y_ref = next(it) if dotted else None
  x_ref, out_ref = next(it), next(it)
  dots_ref = next(it) if dotted else None
  width = x_ref.shape[1]
  r = pl.program_id(0) * rows + lax.iota(jnp.int32, rows)
  valid = r < num_rows
  src = pltriton.load(src_ref.at[r])  # padded to whole blocks: in bounds
  scale = pltriton.load(scale_ref.at[r], mask=valid, other=0.0) if scaled else None
  src2 = jnp.broadcast_to(src[:, None], (rows, cols))
  r2 = jnp.broadcast_to(r[:, None], (rows, cols))

  def body(c, dots):
    cj = c * cols + lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    mask = valid[:, None] & (cj < width)
    v = pltriton.load(x_ref.at[src2, cj], mask=mask, other=0)
    if dotted:
      yv = pltriton.load(y_ref.at[r2, cj], mask=mask, other=0)
      dots = dots + jnp.sum(v.astype(jnp.float32) * yv.astype(jnp.float32), axis=1)
    if scaled:
      v = (v.astype(jnp.float32) * scale[:, None]).astype(v.dtype)
    pltriton.store(out_ref.at[r2, cj], v, mask=mask)
    return dots

  dots = lax.fori_loop(0, pl.cdiv(width, cols), body, jnp.zeros((rows,), jnp.float32))
  if dotted:
    pltriton.store(dots_ref.at[r], dots, mask=valid)


# ----------------------------------------------------------------------------- combine kernels


def _combine_tpu_kernel(slots_ref, w_ref, y_hbm, out_ref, buf, sem, *, k: int):
  """One block of Bt tokens: DMA their K rows each into buf [K, Bt, D], weighted f32 sum.

  Refs: slots [1, Bt*K] (SMEM), w [Bt, K] f32, y [R, D] (HBM), out [Bt, D], scratch, semaphore.
  """
  tokens = out_ref.shape[0]

  def copy(t, j):
    row = slots_ref[0, t * k + j]
    return pltpu.make_async_copy(y_hbm.at[pl.ds(row, 1)], buf.at[j, pl.ds(t, 1)], sem)

  @pl.loop(0, tokens)
  def _(t):
    for j in range(k):
      copy(t, j).start()

  @pl.loop(0, tokens)
  def _(t):
    for j in range(k):
      copy(t, j).wait()

  w = w_ref[...]
  acc = w[:, 0:1] * buf[0].astype(jnp.float32)
  for j in range(1, k):
    acc = acc + w[:, j : j + 1] * buf[j].astype(jnp.float32)
  out_ref[...] = acc.astype(out_ref.dtype)


def _combine_gpu_kernel(
  slots_ref, w_ref, y_ref, out_ref, *, tokens: int, cols: int, num_tokens: int, k: int
):
  """One block of Bt tokens as Triton pointer gathers, Bc columns at a time.

  Refs (whole arrays): slots [T, K] int32, w [T, K] f32, y [R, D], out [T, D].
  """
  width = y_ref.shape[1]
  t = pl.program_id(0) * tokens + lax.iota(jnp.int32, tokens)
  valid = t < num_tokens
  slots = [pltriton.load(slots_ref.at[t, j], mask=valid, other=0) for j in range(k)]
  ws = [pltriton.load(w_ref.at[t, j], mask=valid, other=0.0) for j in range(k)]
  rows = [jnp.broadcast_to(s[:, None], (tokens, cols)) for s in slots]
  t2 = jnp.broadcast_to(t[:, None], (tokens, cols))

  def body(c, carry):
    cj = c * cols + lax.broadcasted_iota(jnp.int32, (tokens, cols), 1)
    mask = valid[:, None] & (cj < width)
    acc = jnp.zeros((tokens, cols), jnp.float32)
    for row, w in zip(rows, ws, strict=True):
      v = pltriton.load(y_ref.at[row, cj], mask=mask, other=0)
      acc = acc + w[:, None] * v.astype(jnp.float32)
    pltriton.store(out_ref.at[t2, cj], acc.astype(out_ref.dtype), mask=mask)
    return carry

  lax.fori_loop(0, pl.cdiv(width, cols), body, 0)


# ----------------------------------------------------------------------------- pallas_call


def _compiler_params(backend: str, interpret: bool, num_warps: int = 4):
  if interpret:
    return None
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def dispatch_metadata_call(
  experts: jax.Array,
  num_experts: int,
  *,
  block_sizes: BlockSizes,
  interpret: bool,
  backend: str = "tpu",
) -> tuple[jax.Array, jax.Array]:
  """Destination row of every pair and the group sizes, from the histogram and rank kernels.

  Args:
    experts: [T, K] int32 expert ids in [0, E).
    num_experts: E.
    block_sizes: Bp is `pairs`.
    interpret: run the kernel bodies in interpret mode.
    backend: "tpu" or "gpu" compiler parameters (the body is the same).

  Returns:
    inv [R] int32 (pair p goes to sorted row inv[p]; stable), group_sizes [E] int32.
  """
  _check_backend(backend)
  flat = experts.reshape(-1).astype(jnp.int32)
  r, bp, ep = flat.shape[0], block_sizes.pairs, _pow2(num_experts)
  if r >= 1 << 24:
    raise ValueError(f"dispatch_metadata: R={r} pairs; float32 counts are exact below 2^24")
  nb = pl.cdiv(r, bp)
  ids = _pad_to(flat, nb * bp, -1)
  col, row = ids[:, None], ids[None, :]
  params = _compiler_params(backend, interpret, num_warps=8)
  counts = pl.pallas_call(
    _histogram_kernel,
    out_shape=jax.ShapeDtypeStruct((nb, 1, ep), jnp.float32),
    grid=(nb,),
    in_specs=[pl.BlockSpec((bp, 1), lambda i: (i, 0))],
    out_specs=pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0)),
    interpret=interpret,
    compiler_params=params,
    name="moe_dispatch_histogram",
  )(col)
  counts = counts[:, 0, :].astype(jnp.int32)  # [nb, Ep]
  sizes = jnp.sum(counts, axis=0)
  starts = jnp.cumsum(sizes) - sizes
  base = starts[None, :] + jnp.cumsum(counts, axis=0) - counts  # [nb, Ep]
  dest = pl.pallas_call(
    _rank_kernel,
    out_shape=jax.ShapeDtypeStruct((nb * bp, 1), jnp.int32),
    grid=(nb,),
    in_specs=[
      pl.BlockSpec((bp, 1), lambda i: (i, 0)),
      pl.BlockSpec((1, bp), lambda i: (0, i)),
      pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0)),
    ],
    out_specs=pl.BlockSpec((bp, 1), lambda i: (i, 0)),
    interpret=interpret,
    compiler_params=params,
    name="moe_dispatch_rank",
  )(col, row, base[:, None, :])
  return dest[:r, 0], sizes[:num_experts]


def gather_rows_call(
  x: jax.Array,
  src: jax.Array,
  scale: jax.Array | None = None,
  y: jax.Array | None = None,
  *,
  block_sizes: BlockSizes,
  interpret: bool,
  backend: str = "tpu",
):
  """out[i] = x[src[i]] (* scale[i]), and dots[i] = <x[src[i]], y[i]> in float32 if y is given.

  Args:
    x: [N, D] rows.
    src: [R] int32 row of x for each output row, in [0, N).
    scale: [R] float32 per-row factor applied in float32, or None.
    y: [R, D] rows to dot the gathered rows with, or None.
    block_sizes: Br is `rows`; Bc is `cols` (gpu).
    interpret: run the kernel body in interpret mode.
    backend: "tpu" (row DMAs) or "gpu" (Triton pointer gathers) kernel body.

  Returns:
    out [R, D] in x.dtype; with y, (out, dots [R] float32).
  """
  _check_backend(backend)
  _, d = x.shape
  r = src.shape[0]
  br = block_sizes.rows
  block_sizes.check_dtype(x.dtype)
  nb = pl.cdiv(r, br)
  src = _pad_to(src.astype(jnp.int32), nb * br)
  scaled, dotted = scale is not None, y is not None
  if backend == "tpu":
    # [nb, 1, Br] with (1, Br) blocks: the last two block dims span the array, which Mosaic
    # takes for any width (a rank-1 block would need Br to be a power of two >= 128).
    operands = [src.reshape(nb, 1, br)]
    in_specs = [pl.BlockSpec((None, 1, br), lambda i: (i, 0, 0), memory_space=pltpu.SMEM)]
    if scaled:
      in_specs.append(pl.BlockSpec((br, 1), lambda i: (i, 0)))
      operands.append(scale.astype(jnp.float32)[:, None])
    if dotted:
      in_specs.append(pl.BlockSpec((br, d), lambda i: (i, 0)))
      operands.append(y)
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    out_specs = [pl.BlockSpec((br, d), lambda i: (i, 0))]
    out_shape = [jax.ShapeDtypeStruct((r, d), x.dtype)]
    if dotted:
      out_specs.append(pl.BlockSpec((br, 1), lambda i: (i, 0)))
      out_shape.append(jax.ShapeDtypeStruct((r, 1), jnp.float32))
    kernel = functools.partial(_gather_tpu_kernel, scaled=scaled, dotted=dotted)
    scratch = [pltpu.SemaphoreType.DMA(())]
  else:
    operands = [src]
    if scaled:
      operands.append(scale.astype(jnp.float32))
    if dotted:
      operands.append(y)
    in_specs = [pl.BlockSpec(memory_space=pl.ANY)] * (len(operands) + 1)
    out_shape = [jax.ShapeDtypeStruct((r, d), x.dtype)]
    if dotted:
      out_shape.append(jax.ShapeDtypeStruct((r,), jnp.float32))
    out_specs = [pl.BlockSpec(memory_space=pl.ANY)] * len(out_shape)
    kernel = functools.partial(
      _gather_gpu_kernel,
      rows=br,
      cols=block_sizes.cols,
      num_rows=r,
      scaled=scaled,
      dotted=dotted,
    )
    scratch = []
  outs = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(nb,),
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
    interpret=interpret,
    compiler_params=_compiler_params(backend, interpret),
    name="moe_gather_rows",
  )(*operands, x)
  if dotted:
    return outs[0], outs[1].reshape(r)
  return outs[0]


def combine_rows_call(
  y: jax.Array,
  slots: jax.Array,
  weights: jax.Array,
  *,
  block_sizes: BlockSizes,
  interpret: bool,
  backend: str = "tpu",
) -> jax.Array:
  """out[t] = sum_k weights[t, k] * y[slots[t, k]], accumulated in float32.

  Args:
    y: [R, D] rows.
    slots: [T, K] int32 rows of y, in [0, R).
    weights: [T, K] factors (used in float32).
    block_sizes: Bt is `tokens`; Bc is `cols` (gpu).
    interpret: run the kernel body in interpret mode.
    backend: "tpu" (row DMAs) or "gpu" (Triton pointer gathers) kernel body.

  Returns:
    [T, D] in y.dtype.
  """
  _check_backend(backend)
  _, d = y.shape
  t, k = slots.shape
  bt = block_sizes.tokens
  block_sizes.check_dtype(y.dtype)
  nb = pl.cdiv(t, bt)
  weights = weights.astype(jnp.float32)
  if backend == "tpu":
    flat = _pad_to(slots.reshape(-1).astype(jnp.int32), nb * bt * k).reshape(nb, 1, bt * k)
    in_specs = [
      pl.BlockSpec((None, 1, bt * k), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
      pl.BlockSpec((bt, k), lambda i: (i, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
    ]
    out_spec = pl.BlockSpec((bt, d), lambda i: (i, 0))
    kernel = functools.partial(_combine_tpu_kernel, k=k)
    scratch = [pltpu.VMEM((k, bt, d), y.dtype), pltpu.SemaphoreType.DMA(())]
    operands = (flat, weights, y)
  else:
    in_specs = [pl.BlockSpec(memory_space=pl.ANY)] * 3
    out_spec = pl.BlockSpec(memory_space=pl.ANY)
    kernel = functools.partial(
      _combine_gpu_kernel, tokens=bt, cols=block_sizes.cols, num_tokens=t, k=k
    )
    scratch = []
    operands = (slots.astype(jnp.int32), weights, y)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((t, d), y.dtype),
    grid=(nb,),
    in_specs=in_specs,
    out_specs=out_spec,
    scratch_shapes=scratch,
    interpret=interpret,
    compiler_params=_compiler_params(backend, interpret),
    name="moe_combine_rows",
  )(*operands)
