"""Pallas grouped matmul: the Mosaic TPU and Triton GPU kernels against the references.

Dims: M rows, K contraction, N output columns, G groups.

One base class checks gmm's forward and VJP (dlhs through gmm with rhs^T, drhs through tgmm)
and tgmm against `gmm_reference` / `tgmm_reference`; subclasses run each kernel in interpret
mode on CPU, and both compiled on a TPU or GPU when one is present. Exports to tpu and cuda
check that the kernels lower on this host.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gmm_pallas as gp

M, K, N, G = 203, 256, 256, 6  # M is not a multiple of any row tile below
M_SMALL = 24  # smaller than every row tile below

# Group sizes [G], sum <= M (or M_SMALL for "m_below_tile").
SIZES = {
  "random": [40, 13, 77, 0, 31, 42],
  "zero_size_groups": [0, 0, 90, 0, 113, 0],
  "one_group_all_rows": [0, 0, 0, M, 0, 0],
  "trailing_rows_unused": [5, 33, 0, 17, 2, 29],  # sum 86 < M: rows 86.. are zero
  "all_empty": [0, 0, 0, 0, 0, 0],
  "m_below_tile": [7, 0, 10, 5, 0, 0],  # M_SMALL rows, 2 unused
}
BF16_CASES = ["random", "trailing_rows_unused", "m_below_tile"]


@functools.partial(jax.jit, static_argnames=("kernel", "interpret", "block_sizes"))
def _gmm_and_vjp(lhs, rhs, group_sizes, dout, kernel, interpret, block_sizes):
  def f(a, b):
    return gp.gmm(a, b, group_sizes, block_sizes=block_sizes, kernel=kernel, interpret=interpret)

  out, vjp = jax.vjp(f, lhs, rhs)
  return (out, *vjp(dout))


@jax.jit
def _reference_gmm_and_vjp(lhs, rhs, group_sizes, dout):
  """The references in float32 (exact products of bf16 inputs, no bf16 rounding of the result)."""
  f32 = [x.astype(jnp.float32) for x in (lhs, rhs, dout)]
  out, vjp = jax.vjp(lambda a, b: pk.gmm_reference(a, b, group_sizes), f32[0], f32[1])
  return (out, *vjp(f32[2]))


def _inputs(m, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((m, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((G, K, N)), dtype)
  dout = jnp.asarray(rng.standard_normal((m, N)), dtype)
  return lhs, rhs, dout


def _assert_close(actual, expected, dtype):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.abs(expected).max(), 1.0)
  if dtype == jnp.float32:  # f32 accumulation in another order than the reference's
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
  else:  # bf16 output rounding: 8 mantissa bits
    np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * scale)


class _GmmPallasBase:
  """Forward and VJP of `gmm_pallas.gmm` with `kernel`, `interpret` and `block_sizes`."""

  kernel = "auto"
  interpret: bool | None = None
  block_sizes: gp.BlockSizes | None = None

  def run(self, lhs, rhs, sizes, dout):
    gs = jnp.asarray(sizes, jnp.int32)
    return _gmm_and_vjp(lhs, rhs, gs, dout, self.kernel, self.interpret, self.block_sizes)

  def check_case(self, case, dtype, seed=0):
    sizes = SIZES[case]
    lhs, rhs, dout = _inputs(M_SMALL if case == "m_below_tile" else M, dtype, seed)
    got = self.run(lhs, rhs, sizes, dout)
    want = _reference_gmm_and_vjp(lhs, rhs, jnp.asarray(sizes, jnp.int32), dout)
    for name, a, b in zip(("out", "dlhs", "drhs"), got, want, strict=True):
      assert a.dtype == dtype, name
      _assert_close(a, b, dtype)
    used = sum(sizes)
    out, dlhs, _ = (np.asarray(x, np.float32) for x in got)
    assert not np.any(out[used:]) and not np.any(dlhs[used:]), "rows past sum(sizes) not zero"

  @pytest.mark.parametrize("case", sorted(SIZES))
  def test_forward_and_vjp_fp32(self, case):
    self.check_case(case, jnp.float32)

  @pytest.mark.parametrize("case", BF16_CASES)
  def test_forward_and_vjp_bf16(self, case):
    self.check_case(case, jnp.bfloat16, seed=1)

  def test_unused_rows_do_not_leak(self):
    """NaN in rows past sum(sizes), in lhs and in dout, must not reach any result."""
    sizes = SIZES["trailing_rows_unused"]
    lhs, rhs, dout = _inputs(M, jnp.float32, seed=2)
    used = sum(sizes)
    want = _reference_gmm_and_vjp(lhs, rhs, jnp.asarray(sizes, jnp.int32), dout.at[used:].set(0))
    got = self.run(lhs.at[used:].set(jnp.nan), rhs, sizes, dout.at[used:].set(jnp.nan))
    for a, b in zip(got, want, strict=True):
      _assert_close(a, b, jnp.float32)

  def test_tgmm(self):
    sizes = jnp.asarray(SIZES["zero_size_groups"], jnp.int32)
    lhs, _, dout = _inputs(M, jnp.float32, seed=3)
    kwargs = dict(block_sizes=self.block_sizes, kernel=self.kernel, interpret=self.interpret)
    got = jax.jit(functools.partial(gp.tgmm, **kwargs))(lhs, dout, sizes)
    assert got.shape == (G, K, N)
    _assert_close(got, pk.tgmm_reference(lhs, dout, sizes), jnp.float32)


class TestMosaicTpuInterpret(_GmmPallasBase):
  """The TPU kernel in interpret mode: 4 row tiles, 2 K and 2 N tiles."""

  kernel = "mosaic_tpu"
  interpret = True
  block_sizes = gp.BlockSizes(tm=64, tk=128, tn=128)


class TestTritonInterpret(_GmmPallasBase):
  """The GPU kernel in interpret mode: 7 row tiles, 4 K and 4 N tiles."""

  kernel = "triton"
  interpret = True
  block_sizes = gp.BlockSizes(tm=32, tk=64, tn=64)


@pytest.mark.skipif(jax.default_backend() not in ("tpu", "gpu"), reason="needs a TPU or GPU")
class TestOnDevice(_GmmPallasBase):
  """The platform's compiled kernel with its tuned tiles."""


def test_auto_kernel_on_cpu_takes_the_cpu_tiles():
  """kernel="auto" on CPU: the Mosaic kernel interpreted (chosen when lowering), with the "cpu"
  entry of a block_sizes mapping; tests/test_gmm.py runs impl="pallas" through the dispatch."""
  sizes = jnp.asarray(SIZES["random"], jnp.int32)
  lhs, rhs, _ = _inputs(M, jnp.float32, seed=4)
  block_sizes = {"cpu": gp.BlockSizes(tm=32, tk=128, tn=128)}
  got = jax.jit(lambda a, b, s: gp.gmm(a, b, s, block_sizes=block_sizes))(lhs, rhs, sizes)
  _assert_close(got, pk.gmm_reference(lhs, rhs, sizes), jnp.float32)


# Triton's custom call has no export compatibility guarantee (jax 0.10.2): exporting it must be
# allowed explicitly. Mosaic's tpu_custom_call is on the stable list.
_CUSTOM_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", sorted(_CUSTOM_CALLS))
def test_export_lowers_the_kernels(platform):
  """jax.export for tpu and cuda from this CPU host holds the compiled kernels, fwd and VJP."""
  bf16 = jnp.bfloat16
  shapes = [jax.ShapeDtypeStruct(s, d) for s, d in (((M, K), bf16), ((G, K, N), bf16))]
  shapes += [jax.ShapeDtypeStruct((G,), jnp.int32), jax.ShapeDtypeStruct((M, N), bf16)]

  def forward(lhs, rhs, gs, dout):
    return pk.gmm(lhs, rhs, gs, impl="pallas")

  def vjp(lhs, rhs, gs, dout):
    return jax.vjp(lambda a, b: pk.gmm(a, b, gs, impl="pallas"), lhs, rhs)[1](dout)

  target = _CUSTOM_CALLS[platform]
  checks = [jax.export.DisabledSafetyCheck.custom_call(target)]
  for f, kernels in ((forward, 1), (vjp, 2)):  # the VJP: gmm for dlhs, tgmm for drhs
    exported = jax.export.export(jax.jit(f), platforms=(platform,), disabled_checks=checks)
    calls = re.findall(r"custom_call @([\w$.]+)\(", exported(*shapes).mlir_module())
    assert calls.count(target) == kernels, (f.__name__, calls)


def test_block_sizes_post_init():
  with pytest.raises(ValueError, match="positive ints"):
    gp.BlockSizes(tm=0, tk=128, tn=128)
  with pytest.raises(ValueError, match="positive ints"):
    gp.BlockSizes(tm=64.0, tk=128, tn=128)


@pytest.mark.parametrize(
  "block_sizes, platform, dtype, message",
  [
    (gp.BlockSizes(8, 128, 256), "tpu", jnp.bfloat16, "tm=8 must be a multiple of 16"),
    (gp.BlockSizes(12, 128, 256), "tpu", jnp.float32, "tm=12 must be a multiple of 8"),
    (gp.BlockSizes(64, 64, 128), "tpu", jnp.float32, "tk=64 must be a multiple of 128"),
    (gp.BlockSizes(64, 128, 192), "tpu", jnp.float32, "tn=192 must be a multiple of 128"),
    (gp.BlockSizes(48, 64, 64), "gpu", jnp.float32, "tm=48 must be a power of 2"),
    (gp.BlockSizes(64, 8, 64), "gpu", jnp.bfloat16, "tk=8 must be a power of 2 >= 16"),
    (gp.BlockSizes(64, 64, 64), "rocm", jnp.float32, "unknown platform"),
  ],
)
def test_block_sizes_check_rejects(block_sizes, platform, dtype, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    block_sizes.check(platform, dtype)


def test_block_sizes_check_accepts_tuned_and_legal_tiles():
  gp.BlockSizes(8, 128, 256).check("tpu", jnp.float32)
  gp.BlockSizes(16, 128, 128).check("tpu", jnp.bfloat16)
  gp.BlockSizes(16, 16, 16).check("gpu", jnp.bfloat16)
  gp.BlockSizes(3, 5, 7).check("cpu", jnp.float32)  # interpret mode takes any tile
  for platform, block_sizes in gp.TUNED_BLOCK_SIZES.items():
    kernel_platform = "tpu" if platform == "cpu" else platform  # CPU interprets the TPU kernel
    block_sizes.check(kernel_platform, jnp.bfloat16)


def test_block_sizes_fit_shrinks_to_the_problem():
  big = gp.BlockSizes(512, 512, 512)
  # M=40 -> 64 rows (M is padded, not divided); K=128 -> 128; N=1408=11*128 -> 128 divides it.
  assert big.fit(40, 128, 1408, "tpu") == gp.BlockSizes(64, 128, 128)
  # On GPU tiles only need powers of 2 >= 16: K=48 -> 16 divides it, rather than padding to 64.
  assert big.fit(40, 48, 1408, "gpu") == gp.BlockSizes(64, 16, 128)
  assert big.fit(4096, 4096, 2048, "tpu") == big


@pytest.mark.parametrize(
  "kernel, block_sizes, message",
  [
    ("mosaic_tpu", gp.BlockSizes(64, 64, 128), "tk=64 must be a multiple of 128"),
    ("triton", gp.BlockSizes(24, 64, 64), "tm=24 must be a power of 2"),
  ],
)
def test_wrappers_check_tiles_even_in_interpret_mode(kernel, block_sizes, message):
  lhs, rhs, _ = _inputs(M, jnp.float32)
  gs = jnp.asarray(SIZES["random"], jnp.int32)
  with pytest.raises(ValueError, match=re.escape(message)):
    gp.gmm(lhs, rhs, gs, block_sizes=block_sizes, kernel=kernel, interpret=True)


def test_bad_kernel_and_block_sizes_keys():
  lhs, rhs, _ = _inputs(M, jnp.float32)
  gs = jnp.zeros((G,), jnp.int32)
  with pytest.raises(ValueError, match="kernel"):
    gp.gmm(lhs, rhs, gs, kernel="mosaic_gpu")
  with pytest.raises(ValueError, match="block_sizes keys"):
    gp.gmm(lhs, rhs, gs, block_sizes={"cuda": gp.BlockSizes(64, 64, 64)})
