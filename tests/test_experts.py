"""routed_experts through the dispatch ops against the dense every-expert reference.

Dims: T tokens, D model, F expert ffn, E experts, K top-k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from r1jax.layers.experts import (
  capacity_mask,
  expert_capacity,
  routed_experts,
  routed_experts_dense_reference,
)

T, D, F, E, K = 48, 16, 8, 8, 3


def _inputs(seed=0, skew=0.0):
  """x, weights, experts (distinct per token, expert 0 favoured by `skew`), wi, wo."""
  rng = np.random.default_rng(seed)
  scores = rng.random((T, E)) + skew * (np.arange(E) == 0)
  experts = np.argsort(-scores, axis=-1)[:, :K].astype(np.int32)
  weights = rng.random((T, K)).astype(np.float32)
  x = rng.standard_normal((T, D)).astype(np.float32)
  wi = (rng.standard_normal((E, D, 2 * F)) * D**-0.5).astype(np.float32)
  wo = (rng.standard_normal((E, F, D)) * F**-0.5).astype(np.float32)
  return x, weights, experts, wi, wo


def _value_and_grads(fn, x, weights, experts, wi, wo, cotangent):
  def loss(x, weights, wi, wo):
    return jnp.sum(fn(x, weights, experts, wi, wo) * cotangent)

  out = fn(x, weights, experts, wi, wo)
  return out, jax.grad(loss, argnums=(0, 1, 2, 3))(x, weights, wi, wo)


def _assert_rel_close(got, want, tol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.abs(got - want).max() <= tol * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("impl", ["xla", "reference", "auto"])
def test_dropless_matches_dense_reference(impl):
  x, weights, experts, wi, wo = _inputs()
  cotangent = np.random.default_rng(9).standard_normal((T, D)).astype(np.float32)
  fn = jax.jit(lambda *a: routed_experts(*a, impl=impl))
  got, got_grads = _value_and_grads(fn, x, weights, experts, wi, wo, cotangent)
  want, want_grads = _value_and_grads(
    routed_experts_dense_reference, x, weights, experts, wi, wo, cotangent
  )
  assert got.dtype == jnp.float32 and got.shape == (T, D)
  _assert_rel_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads, strict=True):  # x, weights, wi, wo
    _assert_rel_close(g, w, 1e-5)


def test_large_capacity_factor_is_dropless():
  x, weights, experts, wi, wo = _inputs(seed=1, skew=2.0)
  dropless = jax.jit(routed_experts)(x, weights, experts, wi, wo)
  generous = jax.jit(lambda *a: routed_experts(*a, capacity_factor=float(E)))(  # C = T*K
    x, weights, experts, wi, wo
  )
  np.testing.assert_array_equal(generous, dropless)


def np_kept(experts, capacity):
  """First come first served in token order: [T, K] bool."""
  taken = np.zeros(E, int)
  kept = np.zeros(experts.shape, bool)
  for t in range(experts.shape[0]):
    for k in range(experts.shape[1]):
      e = experts[t, k]
      kept[t, k] = taken[e] < capacity
      taken[e] += 1
  return kept


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_small_capacity_drops_exactly_the_overflow(impl, capacity_factor):
  x, weights, experts, wi, wo = _inputs(seed=2, skew=2.0)  # expert 0 overflows
  capacity = math.ceil(capacity_factor * T * K / E)
  assert expert_capacity(capacity_factor, T, K, E) == capacity
  kept = np_kept(experts, capacity)
  assert 0 < kept.sum() < kept.size
  np.testing.assert_array_equal(capacity_mask(jnp.asarray(experts), E, capacity), kept)

  cotangent = np.random.default_rng(8).standard_normal((T, D)).astype(np.float32)
  fn = jax.jit(lambda *a: routed_experts(*a, impl=impl, capacity_factor=capacity_factor))
  got, got_grads = _value_and_grads(fn, x, weights, experts, wi, wo, cotangent)

  def dense_kept(x, weights, experts, wi, wo):  # the dropped pairs simply have no weight
    return routed_experts_dense_reference(x, jnp.where(kept, weights, 0.0), experts, wi, wo)

  want, want_grads = _value_and_grads(dense_kept, x, weights, experts, wi, wo, cotangent)
  _assert_rel_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads, strict=True):
    _assert_rel_close(g, w, 1e-5)
  assert not np.any(np.asarray(got_grads[1])[~kept])  # no gradient to a dropped pair's weight


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_decode_sizes_take_the_pair_loop_and_match_the_reference(capacity_factor):
  """T*K <= 2E (here 4 tokens x 3 = 12 pairs over 8 experts): the xla impl loops over the
  pairs instead of the grouped matmuls; values and all four gradients as the dense reference,
  dropped pairs included."""
  x, weights, experts, wi, wo = (a[:4] if a.shape[0] == T else a for a in _inputs(seed=5))
  experts[1, 0] = experts[0, 0]  # two tokens on one expert
  cotangent = np.random.default_rng(7).standard_normal((4, D)).astype(np.float32)
  fn = jax.jit(lambda *a: routed_experts(*a, impl="xla", capacity_factor=capacity_factor))
  jaxpr = str(jax.make_jaxpr(fn)(x, weights, experts, wi, wo))
  assert "scan" in jaxpr  # the pair loop (a fori_loop of static length)
  if capacity_factor is None:
    assert " sort[" not in jaxpr  # no dispatch sort
  kept = np.ones(experts.shape, bool)
  if capacity_factor:
    kept = np_kept(experts, expert_capacity(capacity_factor, 4, K, E))
    assert not kept.all()

  def dense_kept(x, weights, experts, wi, wo):
    return routed_experts_dense_reference(x, jnp.where(kept, weights, 0.0), experts, wi, wo)

  got, got_grads = _value_and_grads(fn, x, weights, experts, wi, wo, cotangent)
  want, want_grads = _value_and_grads(dense_kept, x, weights, experts, wi, wo, cotangent)
  _assert_rel_close(got, want, 1e-5)
  for g, w in zip(got_grads, want_grads, strict=True):
    _assert_rel_close(g, w, 1e-5)


def test_the_pair_loop_skips_foreign_expert_ids_and_runs_in_bfloat16():
  x, weights, experts, wi, wo = (a[:4] if a.shape[0] == T else a for a in _inputs(seed=6))
  foreign = experts.copy()
  foreign[:, -1] = E  # "no expert here": another shard's pair under expert parallelism
  got = routed_experts(x, weights, foreign, wi, wo, impl="xla", drop_id=True)
  want = routed_experts_dense_reference(x, weights[:, :-1], experts[:, :-1], wi, wo)
  _assert_rel_close(got, want, 1e-5)
  got16 = jax.jit(lambda *a: routed_experts(*a, impl="xla"))(
    jnp.asarray(x, jnp.bfloat16), weights, experts, wi, wo
  )
  assert got16.dtype == jnp.bfloat16
  _assert_rel_close(got16, routed_experts_dense_reference(x, weights, experts, wi, wo), 3e-2)


def test_bfloat16_compute_dtype():
  x, weights, experts, wi, wo = _inputs(seed=3)
  want = routed_experts_dense_reference(x, weights, experts, wi, wo)
  x16 = jnp.asarray(x, jnp.bfloat16)
  got = jax.jit(routed_experts)(x16, weights, experts, wi, wo)
  assert got.dtype == jnp.bfloat16
  _assert_rel_close(got, want, 3e-2)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_forward_and_backward_lower_for_accelerators(platform):
  x, weights, experts, wi, wo = _inputs()

  def loss(x, weights, wi, wo):
    return jnp.sum(routed_experts(x, weights, experts, wi, wo, capacity_factor=1.0) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  exported = export.export(grad, platforms=(platform,))(x, weights, wi, wo)
  assert exported.platforms == (platform,)


def test_shape_errors():
  x, weights, experts, wi, wo = _inputs()
  with pytest.raises(ValueError, match="wi"):
    routed_experts(x, weights, experts, wi[:, :, :-1], wo)
  with pytest.raises(ValueError, match="experts"):
    routed_experts(x, weights[:, :2], experts, wi, wo)
  with pytest.raises(ValueError, match="capacity_factor"):
    routed_experts(x, weights, experts, wi, wo, capacity_factor=0.0)
