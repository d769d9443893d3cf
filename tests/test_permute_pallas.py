"""The pallas dispatch kernels (impl="pallas") against the reference impl: forward and VJP.

Dims: T tokens, K slots per token, E experts, D row width, R = T*K. One base class holds the
cases; the interpret subclass runs them on CPU (impl="pallas" there interprets the TPU kernel
bodies), the device subclass compiled on a TPU or GPU when one is present. The kernel-level
tests run each body (TPU and Triton) on its own, in interpret mode on CPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import permute_pallas

T, D = 37, 128
# T = 37 is a multiple of none of these blocks: every kernel has a partial last block.
BLOCK = permute_pallas.BlockSizes(rows=16, tokens=16, pairs=128, cols=64)
TOL = {
  jnp.float32: dict(rtol=1e-5, atol=1e-5),
  jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _random_experts(e, k, seed):
  """Distinct experts per token, as top-k gives."""
  rng = np.random.default_rng(seed)
  return np.stack([rng.permutation(e)[:k] for _ in range(T)]).astype(np.int32)


# name -> (experts [T, K], E)
CASES = {
  # E=32 with K=1: most experts get no token or a few; several are empty.
  "top1_sparse": (_random_experts(32, 1, seed=0), 32),
  "top8": (_random_experts(16, 8, seed=1), 16),
  "one_expert_takes_all": (np.full((T, 1), 5, np.int32), 8),
}


def test_cases_cover_empty_and_full_experts():
  sizes = np.bincount(CASES["top1_sparse"][0].ravel(), minlength=32)
  assert (sizes == 0).sum() >= 5
  assert np.bincount(CASES["one_expert_takes_all"][0].ravel()).max() == T


def _roundtrip(impl, block_sizes, experts, num_experts):
  """x, extra, weights, cotangent -> (x_sorted, group_sizes, perm, out, dx, dextra, dweights)."""

  def f(x, extra, weights, ct):
    def ops(x, extra, weights):
      x_sorted, sizes, perm = pk.permute(
        x, experts, num_experts, impl=impl, block_sizes=block_sizes
      )
      out = pk.unpermute(x_sorted * 2 + extra, perm, weights, impl=impl, block_sizes=block_sizes)
      return out, (x_sorted, sizes, perm)

    out, vjp, (x_sorted, sizes, perm) = jax.vjp(ops, x, extra, weights, has_aux=True)
    return (x_sorted, sizes, perm, out, *vjp(ct))

  return jax.jit(f)


class _PermutePallasCases:
  """Pallas vs reference; subclasses choose where the pallas impl runs."""

  block_sizes: permute_pallas.BlockSizes | None = BLOCK

  def _check(self, experts, num_experts, dtype):
    t, k = experts.shape
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((t, D)), dtype)
    extra = jnp.asarray(rng.standard_normal((t * k, D)), dtype)
    weights = jnp.asarray(rng.random((t, k)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((t, D)), dtype)
    experts = jnp.asarray(experts)
    got = _roundtrip("pallas", self.block_sizes, experts, num_experts)(x, extra, weights, ct)
    want = _roundtrip("reference", None, experts, num_experts)(x, extra, weights, ct)
    x_sorted, sizes, perm = got[:3]
    # The permutation and the sizes are integers; the gather copies rows: all exact.
    np.testing.assert_array_equal(perm, want[2])
    np.testing.assert_array_equal(sizes, want[1])
    np.testing.assert_array_equal(
      sizes, np.bincount(np.asarray(experts).ravel(), minlength=num_experts)
    )
    np.testing.assert_array_equal(np.asarray(x_sorted, np.float32), np.asarray(want[0], np.float32))
    for name, g, w in zip(("out", "dx", "dextra", "dweights"), got[3:], want[3:], strict=True):
      assert g.dtype == w.dtype, name
      np.testing.assert_allclose(
        np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name, **TOL[dtype]
      )

  @pytest.mark.parametrize("case", sorted(CASES))
  def test_matches_reference(self, case):
    experts, num_experts = CASES[case]
    self._check(experts, num_experts, jnp.float32)

  def test_bf16(self):
    self._check(*CASES["top8"], jnp.bfloat16)

  def test_capacity_overflow_id_sorts_last(self):
    # routed_experts marks dropped pairs with the extra id E and passes E + 1 experts.
    experts, e = _random_experts(8, 2, seed=3), 8
    experts[::3, 1] = e
    self._check(experts, e + 1, jnp.float32)


class TestPermutePallasInterpret(_PermutePallasCases):
  """impl="pallas" on CPU: the TPU kernel bodies in interpret mode."""


@pytest.mark.skipif(
  jax.default_backend() not in ("tpu", "gpu"), reason="needs a TPU or GPU (compiled kernels)"
)
class TestPermutePallasOnDevice(_PermutePallasCases):
  """The compiled kernels with the platform's tuned block sizes."""

  block_sizes = None


# ----------------------------------------------------------------------------- kernel level


@pytest.mark.parametrize("backend", permute_pallas.BACKENDS)
def test_gather_kernel_bodies(backend):
  """Plain gather, and the scaled gather with dots that the unpermute VJP uses."""
  rng = np.random.default_rng(10)
  r, n, d = 45, 20, 200  # D = 200: a partial column chunk for the Triton body (Bc = 64)
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((r, d)), jnp.float32)
  src = jnp.asarray(rng.integers(0, n, r), jnp.int32)
  scale = jnp.asarray(rng.random(r), jnp.float32)
  kw = dict(block_sizes=BLOCK, interpret=True, backend=backend)

  def both(x, src, scale, y):
    plain = permute_pallas.gather_rows_call(x, src, **kw)
    return plain, *permute_pallas.gather_rows_call(x, src, scale, y, **kw)

  plain, scaled, dots = jax.jit(both)(x, src, scale, y)
  rows = np.asarray(x)[np.asarray(src)]
  np.testing.assert_array_equal(plain, rows)
  np.testing.assert_allclose(scaled, rows * np.asarray(scale)[:, None], rtol=1e-6)
  np.testing.assert_allclose(dots, np.sum(rows * np.asarray(y), axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", permute_pallas.BACKENDS)
def test_combine_kernel_body(backend):
  rng = np.random.default_rng(11)
  t, k, d = 21, 3, 200
  y = jnp.asarray(rng.standard_normal((t * k, d)), jnp.bfloat16)
  slots = jnp.asarray(rng.permutation(t * k).reshape(t, k), jnp.int32)
  w = jnp.asarray(rng.random((t, k)), jnp.float32)
  kw = dict(block_sizes=BLOCK, interpret=True, backend=backend)
  got = jax.jit(lambda y, s, w: permute_pallas.combine_rows_call(y, s, w, **kw))(y, slots, w)
  want = np.einsum("tkd,tk->td", np.asarray(y, np.float32)[np.asarray(slots)], np.asarray(w))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def test_dispatch_metadata_is_the_stable_sort():
  experts = _random_experts(16, 4, seed=12)
  fn = jax.jit(
    lambda e: permute_pallas.dispatch_metadata_call(e, 16, block_sizes=BLOCK, interpret=True)
  )
  inv, sizes = fn(jnp.asarray(experts))
  order = np.argsort(experts.ravel(), kind="stable")
  np.testing.assert_array_equal(np.asarray(inv)[order], np.arange(order.size))
  np.testing.assert_array_equal(sizes, np.bincount(experts.ravel(), minlength=16))


# ----------------------------------------------------------------------------- export, sizes


@pytest.mark.parametrize(
  ("platform", "target"), [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")]
)
def test_export_lowers_the_kernels(platform, target):
  """jax.export of permute -> unpermute and its VJP for a device, from this CPU host."""
  e = 16

  def f(x, experts, weights, ct):
    def ops(x, weights):
      x_sorted, _, perm = pk.permute(x, experts, e, impl="pallas")
      return pk.unpermute(x_sorted, perm, weights, impl="pallas")

    out, vjp = jax.vjp(ops, x, weights)
    return out, *vjp(ct)

  args = (
    jax.ShapeDtypeStruct((T, D), jnp.bfloat16),
    jax.ShapeDtypeStruct((T, 4), jnp.int32),
    jax.ShapeDtypeStruct((T, 4), jnp.float32),
    jax.ShapeDtypeStruct((T, D), jnp.bfloat16),
  )
  # Triton IR carries no compatibility guarantee, so export refuses it unless told.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(f), platforms=(platform,), disabled_checks=unchecked)(*args)
  targets = re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())
  # histogram, rank, gather, combine forward; combine (dx) and gather with dots backward.
  assert targets.count(target) == 6, targets


@pytest.mark.parametrize(
  "kwargs",
  [dict(rows=24), dict(rows=4), dict(tokens=12), dict(pairs=64), dict(cols=100), dict(rows=8.0)],
)
def test_block_sizes_validation(kwargs):
  with pytest.raises(ValueError, match="BlockSizes"):
    permute_pallas.BlockSizes(**kwargs)


def test_block_sizes_dtype_tiles():
  permute_pallas.BlockSizes(rows=8, tokens=8).check_dtype(jnp.float32)
  with pytest.raises(ValueError, match="multiples of 16"):
    permute_pallas.BlockSizes(rows=8, tokens=16).check_dtype(jnp.bfloat16)
  with pytest.raises(ValueError, match="backend"):
    permute_pallas.combine_rows_call(
      jnp.zeros((4, 8)),
      jnp.zeros((2, 2), jnp.int32),
      jnp.ones((2, 2)),
      block_sizes=BLOCK,
      interpret=True,
      backend="cuda",
    )
