"""Grouped matmul: xla, reference and pallas impls against a float64 numpy loop, forward and VJP.

The pallas impl runs here through the dispatch (on CPU: the Mosaic kernel in interpret mode,
tiles padded from K=16, N=24); tests/test_gmm_pallas.py tests its kernels one by one.

Dims: M rows, K contraction, N output columns, G groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import gmm_pallas

M, K, N, G = 203, 16, 24, 6

# Group sizes [G] (sum <= M) covering the edge cases of the tile loops.
SIZES = {
  "random": [40, 13, 77, 0, 31, 42],
  "zero_size_groups": [0, 0, 90, 0, 113, 0],
  "one_group_all_rows": [0, 0, 0, M, 0, 0],
  "trailing_rows_unused": [5, 33, 0, 17, 2, 29],  # sum 86 < M: rows 86.. are zero
  "all_empty": [0, 0, 0, 0, 0, 0],
  "last_group_ends_at_m": [64, 1, 0, 31, 0, 107],  # tail tiles clamped at the end of lhs
}
TILINGS = {
  "default": None,
  "two_level": pk.GmmTiling(rows=32, tail_rows=8),
  "single": 16,
  "bigger_than_m": 512,
}


def np_gmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start : start + size] = lhs[start : start + size] @ rhs[g]
    start += size
  return out


def np_tgmm(lhs, dout, sizes):
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out = np.zeros((len(sizes), lhs.shape[1], dout.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start : start + size].T @ dout[start : start + size]
    start += size
  return out


def np_gmm_vjp(lhs, rhs, sizes, dout):
  """(dlhs, drhs) of sum(gmm * dout): dlhs rows of group g = dout @ rhs[g]^T, zero past the end."""
  rhs_t = np.swapaxes(np.asarray(rhs, np.float64), 1, 2)
  return np_gmm(dout, rhs_t, sizes), np_tgmm(lhs, dout, sizes)


@functools.partial(jax.jit, static_argnames=("impl", "tile"))
def _gmm_and_vjp(lhs, rhs, group_sizes, dout, impl, tile):
  out, vjp = jax.vjp(lambda a, b: pk.gmm(a, b, group_sizes, impl=impl, tile=tile), lhs, rhs)
  return (out, *vjp(dout))


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((G, K, N)), dtype)
  dout = jnp.asarray(rng.standard_normal((M, N)), dtype)
  return lhs, rhs, dout


def _assert_close(actual, expected, dtype):
  actual = np.asarray(actual, np.float64)
  if dtype == jnp.float32:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  else:  # bf16 output rounding (8 mantissa bits) on sums of K or ~M/G products of O(1) terms
    np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
@pytest.mark.parametrize("case", sorted(SIZES))
def test_forward_and_vjp_fp32(impl, case):
  sizes = SIZES[case]
  lhs, rhs, dout = _inputs(jnp.float32)
  out, dlhs, drhs = _gmm_and_vjp(lhs, rhs, jnp.array(sizes, jnp.int32), dout, impl, None)
  want_dlhs, want_drhs = np_gmm_vjp(lhs, rhs, sizes, dout)
  _assert_close(out, np_gmm(lhs, rhs, sizes), jnp.float32)
  _assert_close(dlhs, want_dlhs, jnp.float32)
  _assert_close(drhs, want_drhs, jnp.float32)
  used = sum(sizes)
  assert not np.any(np.asarray(out)[used:]) and not np.any(np.asarray(dlhs)[used:])


@pytest.mark.parametrize("tiling", sorted(TILINGS))
@pytest.mark.parametrize("case", ["random", "trailing_rows_unused", "last_group_ends_at_m"])
def test_xla_tilings_match_numpy(tiling, case):
  sizes = SIZES[case]
  lhs, rhs, dout = _inputs(jnp.float32, seed=1)
  tile = TILINGS[tiling]
  out, dlhs, drhs = _gmm_and_vjp(lhs, rhs, jnp.array(sizes, jnp.int32), dout, "xla", tile)
  want_dlhs, want_drhs = np_gmm_vjp(lhs, rhs, sizes, dout)
  _assert_close(out, np_gmm(lhs, rhs, sizes), jnp.float32)
  _assert_close(dlhs, want_dlhs, jnp.float32)
  _assert_close(drhs, want_drhs, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
@pytest.mark.parametrize("case", ["random", "zero_size_groups", "trailing_rows_unused"])
def test_forward_and_vjp_bf16(impl, case):
  sizes = SIZES[case]
  lhs, rhs, dout = _inputs(jnp.bfloat16, seed=2)
  out, dlhs, drhs = _gmm_and_vjp(lhs, rhs, jnp.array(sizes, jnp.int32), dout, impl, None)
  assert out.dtype == dlhs.dtype == drhs.dtype == jnp.bfloat16
  want_dlhs, want_drhs = np_gmm_vjp(lhs, rhs, sizes, dout)
  _assert_close(out, np_gmm(lhs, rhs, sizes), jnp.bfloat16)
  _assert_close(dlhs, want_dlhs, jnp.bfloat16)
  _assert_close(drhs, want_drhs, jnp.bfloat16)


@pytest.mark.parametrize("sizes", [[0, 1, 0, 0, 2, 1, 0, 3], [0, 0, 0, 0, 0, 0, 0, 5]])
def test_xla_decode_sizes_few_rows_over_many_groups(sizes):
  """A decode step's shape: fewer rows than groups, so one-row tail tiles and skipped empty
  groups (rows past the used ones stay zero)."""
  rng = np.random.default_rng(4)
  m, g = 9, len(sizes)
  lhs = jnp.asarray(rng.standard_normal((m, K)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((g, K, N)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((m, N)), jnp.float32)
  out, dlhs, drhs = _gmm_and_vjp(lhs, rhs, jnp.array(sizes, jnp.int32), dout, "xla", None)
  want_dlhs, want_drhs = np_gmm_vjp(lhs, rhs, sizes, dout)
  _assert_close(out, np_gmm(lhs, rhs, sizes), jnp.float32)
  _assert_close(dlhs, want_dlhs, jnp.float32)
  _assert_close(drhs, want_drhs, jnp.float32)


def test_xla_matches_reference_on_random_sizes():
  rng = np.random.default_rng(3)
  lhs, rhs, dout = _inputs(jnp.float32, seed=3)
  for _ in range(3):
    sizes = rng.multinomial(rng.integers(0, M + 1), np.ones(G) / G).astype(np.int32)
    gs = jnp.asarray(sizes)
    got = _gmm_and_vjp(lhs, rhs, gs, dout, "xla", pk.GmmTiling(rows=32, tail_rows=8))
    want = _gmm_and_vjp(lhs, rhs, gs, dout, "reference", None)
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_tgmm_matches_numpy(impl):
  sizes = SIZES["trailing_rows_unused"]
  lhs, _, dout = _inputs(jnp.float32, seed=4)
  tile = gmm_pallas.BlockSizes(32, 128, 128) if impl == "pallas" else pk.GmmTiling(32, 8)
  got = pk.tgmm(lhs, dout, jnp.array(sizes, jnp.int32), impl=impl, tile=tile)
  _assert_close(got, np_tgmm(lhs, dout, sizes), jnp.float32)


def test_ragged_dot_baseline_matches_numpy():
  sizes = SIZES["random"]
  lhs, rhs, _ = _inputs(jnp.float32, seed=5)
  got = pk.ragged_dot_gmm(lhs, rhs, jnp.array(sizes, jnp.int32))
  _assert_close(got, np_gmm(lhs, rhs, sizes), jnp.float32)


def test_bad_impl_and_arguments():
  lhs, rhs, _ = _inputs(jnp.float32)
  gs = jnp.array(SIZES["random"], jnp.int32)
  with pytest.raises(ValueError, match="impl"):
    pk.gmm(lhs, rhs, gs, impl="cuda")
  with pytest.raises(ValueError, match="BlockSizes"):  # xla tiles mean nothing to the kernels
    pk.gmm(lhs, rhs, gs, impl="pallas", tile=pk.GmmTiling(rows=32, tail_rows=8))
  with pytest.raises(ValueError, match="group_sizes"):
    pk.gmm(lhs, rhs, gs.astype(jnp.float32))
  with pytest.raises(ValueError, match="tail_rows"):
    pk.GmmTiling(rows=8, tail_rows=16)
