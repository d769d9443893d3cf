"""The pallas gate kernel (impl="pallas") against route_reference: forward, counts and VJP.

Dims: T tokens, E experts, K top-k, G groups. One base class holds the cases; the interpret
subclass runs them on CPU (the kernel body in interpret mode), the device subclass compiled on a
TPU or GPU when one is present. Shapes are small: interpret mode is slow.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import router

V3 = dict(
  top_k=8,
  score_func="sigmoid",
  n_group=4,
  topk_group=2,
  group_score="top2sum",
  norm_topk_prob=True,
  routed_scaling_factor=2.5,
)
V2 = dict(
  top_k=6,
  score_func="softmax",
  n_group=4,
  topk_group=2,
  group_score="max",
  norm_topk_prob=False,
  routed_scaling_factor=16.0,
)
TOP1 = dict(top_k=1, score_func="softmax", norm_topk_prob=False)

# (gate, E, T, with bias): T is never a multiple of the token block used below.
CASES = {
  "v3_sigmoid_top2sum_bias": (V3, 32, 37, True),
  "v2_softmax_max_norenorm": (V2, 16, 45, False),
  "top1": (TOP1, 8, 21, False),
  "e_not_pow2": (dict(V3, top_k=4, n_group=3, topk_group=2), 24, 19, True),
}
BLOCK = router.BlockSizes(tokens=16)
# Weights are float32 either way (the kernel upcasts); bf16 only rounds the logits, and the
# logits gradient comes back in bf16.
GRAD_TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-6), jnp.bfloat16: dict(rtol=2e-2, atol=1e-3)}


def _logits(t, e, seed):
  return np.random.default_rng(seed).standard_normal((t, e)).astype(np.float32)


def _bias(e, seed):
  return np.random.default_rng(seed).uniform(-0.05, 0.05, e).astype(np.float32)


class _RouterPallasCases:
  """Pallas vs reference; subclasses choose where the pallas impl runs."""

  block_sizes: router.BlockSizes | None = BLOCK

  def _check(self, logits, bias, gate, dtype=jnp.float32):
    t, e = logits.shape
    logits = jnp.asarray(logits, dtype)
    bias = None if bias is None else jnp.asarray(bias)
    ct = jnp.asarray(np.random.default_rng(9).standard_normal((t, gate["top_k"])), jnp.float32)
    w, ex, counts, grad = _jit_fwd_and_grad(logits, bias, gate, ct, "pallas", self.block_sizes)
    w_ref, ex_ref, counts_ref, grad_ref = _jit_fwd_and_grad(logits, bias, gate, ct, "xla", None)
    assert w.dtype == jnp.float32 and ex.dtype == jnp.int32 and counts.dtype == jnp.int32
    np.testing.assert_array_equal(ex, ex_ref)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(ex).ravel(), minlength=e))
    np.testing.assert_array_equal(counts, counts_ref)
    assert grad.dtype == dtype
    np.testing.assert_allclose(
      np.asarray(grad, np.float32), np.asarray(grad_ref, np.float32), **GRAD_TOL[dtype]
    )
    return ex

  @pytest.mark.parametrize("case", sorted(CASES))
  def test_matches_reference(self, case):
    gate, e, t, with_bias = CASES[case]
    self._check(_logits(t, e, seed=1), _bias(e, seed=2) if with_bias else None, gate)

  def test_bf16_logits(self):
    gate, e, t, with_bias = CASES["v3_sigmoid_top2sum_bias"]
    logits = np.asarray(jnp.asarray(_logits(t, e, seed=3), jnp.bfloat16).astype(jnp.float32))
    self._check(logits, _bias(e, seed=4) if with_bias else None, gate, dtype=jnp.bfloat16)

  def test_ties_resolve_like_lax_top_k(self):
    # Few distinct values: many exact ties among experts and among group scores; row 0 is
    # all-equal (every expert and group ties), so the lowest indices must win.
    t, e = 37, 32
    logits = np.random.default_rng(5).integers(-2, 3, (t, e)).astype(np.float32) / 2
    logits[0] = 0.25
    for gate in (V3, V2):
      experts = self._check(logits, None, gate)
      # Row 0: the two lowest groups win their tie, then the K lowest experts in them.
      np.testing.assert_array_equal(experts[0], np.arange(gate["top_k"]))

  def test_one_expert_takes_every_token(self):
    t, e = 37, 16
    bias = np.zeros(e, np.float32)
    bias[5] = 10.0  # beats any sigmoid score difference: expert 5 is everyone's first choice
    gate = dict(V3, top_k=2, n_group=1, topk_group=1)
    experts = self._check(_logits(t, e, seed=6), bias, gate)
    assert np.all(np.asarray(experts)[:, 0] == 5)


def _jit_fwd_and_grad(logits, bias, gate, ct, impl, block_sizes):
  """weights, experts, counts and d<weights, ct>/dlogits under one jit (one compile)."""

  def f(z, ct):
    def weights(z):
      w, e, c = router.route_with_counts(z, bias, **gate, impl=impl, block_sizes=block_sizes)
      return w, (e, c)

    w, vjp, (e, c) = jax.vjp(weights, z, has_aux=True)
    return w, e, c, vjp(ct)[0]

  return jax.jit(f)(logits, ct)


class TestRouterPallasInterpret(_RouterPallasCases):
  """The kernel body in interpret mode on CPU (what impl="pallas" lowers to there)."""


@pytest.mark.skipif(
  jax.default_backend() not in ("tpu", "gpu"), reason="needs a TPU or GPU (compiled kernel)"
)
class TestRouterPallasOnDevice(_RouterPallasCases):
  """The compiled kernel with the platform's tuned block sizes."""

  block_sizes = None


def test_xla_counts():
  logits = jnp.asarray(_logits(21, 16, seed=7))
  _, e, counts = jax.jit(lambda z: router.route_with_counts(z, None, **V2, impl="xla"))(logits)
  np.testing.assert_array_equal(counts, np.bincount(np.asarray(e).ravel(), minlength=16))


@pytest.mark.parametrize("tokens", [0, 4, 12, 24, 8.0])
def test_block_sizes_validation(tokens):
  with pytest.raises(ValueError, match="tokens"):
    router.BlockSizes(tokens=tokens)


def test_block_sizes_accepts_powers_of_two():
  assert router.BlockSizes(tokens=8).tokens == 8
  assert router.TUNED_BLOCK_SIZES["tpu"].tokens % 8 == 0


@pytest.mark.parametrize(
  ("platform", "target"), [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")]
)
def test_export_lowers_the_kernel(platform, target):
  """jax.export for a device from this CPU host: the platform's kernel, not interpret mode."""

  def f(logits, bias, ct):
    def weights(z):
      w, e, c = router.route_with_counts(z, bias, **V3, impl="pallas")
      return w, (e, c)

    w, vjp, (e, c) = jax.vjp(weights, logits, has_aux=True)
    return w, e, c, vjp(ct)[0]

  args = (
    jax.ShapeDtypeStruct((40, 32), jnp.float32),
    jax.ShapeDtypeStruct((32,), jnp.float32),
    jax.ShapeDtypeStruct((40, 8), jnp.float32),
  )
  # Triton IR carries no compatibility guarantee, so export refuses it unless told.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(f), platforms=(platform,), disabled_checks=unchecked)(*args)
  targets = re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())
  assert targets.count(target) == 1, targets
