"""permute / unpermute against a numpy re-derivation, and their VJPs against naive autodiff.

Dims: T tokens, K slots per token, E experts, D and F row widths, R = T*K.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

T, E, D, F = 37, 16, 5, 7


def _assignments(top_k, seed=0):
  """Distinct experts per token (as top-k gives), random weights."""
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.permutation(E)[:top_k] for _ in range(T)]).astype(np.int32)
  weights = rng.random((T, top_k)).astype(np.float32)
  return experts, weights


def np_permute(x, experts):
  """Pairs (t, k) in row-major order, sorted stably by expert."""
  k = experts.shape[1]
  pairs = [(experts[t, j], t * k + j) for t in range(experts.shape[0]) for j in range(k)]
  order = np.array([p for _, p in sorted(pairs, key=lambda pair: pair[0])])  # sorted() is stable
  sizes = np.bincount(experts.reshape(-1), minlength=E)
  return np.asarray(x)[order // k], sizes, order


def np_unpermute(y_sorted, order, weights):
  t, k = weights.shape
  out = np.zeros((t, y_sorted.shape[1]))
  for i, pair in enumerate(order):
    out[pair // k] += weights[pair // k, pair % k] * np.asarray(y_sorted, np.float64)[i]
  return out


@pytest.mark.parametrize("impl", ["xla", "reference", "auto", "pallas"])
@pytest.mark.parametrize("top_k", [1, 8])
def test_permute_matches_numpy(impl, top_k):
  experts, _ = _assignments(top_k)
  x = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
  x_sorted, sizes, perm = pk.permute(jnp.asarray(x), jnp.asarray(experts), E, impl=impl)
  want_x, want_sizes, want_order = np_permute(x, experts)
  assert sizes.dtype == jnp.int32 and perm.shape == (T * top_k,)
  np.testing.assert_array_equal(sizes, want_sizes)
  np.testing.assert_array_equal(x_sorted, want_x)
  # Within one expert the rows keep token order (the sort is stable).
  np.testing.assert_array_equal(perm, want_order)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("top_k", [1, 8])
def test_unpermute_matches_numpy(impl, top_k):
  experts, weights = _assignments(top_k, seed=2)
  y_sorted = np.random.default_rng(3).standard_normal((T * top_k, F)).astype(np.float32)
  _, _, perm = pk.permute(jnp.zeros((T, 1)), jnp.asarray(experts), E, impl=impl)
  got = pk.unpermute(jnp.asarray(y_sorted), perm, jnp.asarray(weights), impl=impl)
  want = np_unpermute(y_sorted, np_permute(np.zeros((T, 1)), experts)[2], weights)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _naive_roundtrip(x, y_extra, weights, order, top_k):
  """Autodiff-able naive version: fancy indexing with a numpy-derived order."""
  inv = np.argsort(order)
  x_sorted = x[order // top_k]
  y_sorted = x_sorted * 2.0 + y_extra
  rows = y_sorted[inv].reshape(T, top_k, -1)
  return jnp.einsum("tkd,tk->td", rows, weights)


@pytest.mark.parametrize("impl", ["xla", "reference"])  # pallas: test_permute_pallas.py
@pytest.mark.parametrize("top_k", [1, 8])
def test_gradients_match_naive_autodiff(impl, top_k):
  experts, weights = _assignments(top_k, seed=4)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  y_extra = jnp.asarray(rng.standard_normal((T * top_k, D)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  order = np_permute(np.zeros((T, 1)), experts)[2]

  def ops(x, y_extra, weights):
    x_sorted, _, perm = pk.permute(x, jnp.asarray(experts), E, impl=impl)
    return pk.unpermute(x_sorted * 2.0 + y_extra, perm, weights, impl=impl)

  def naive(x, y_extra, weights):
    return _naive_roundtrip(x, y_extra, weights, order, top_k)

  args = (x, y_extra, jnp.asarray(weights))
  got_out, got_vjp = jax.vjp(jax.jit(ops), *args)
  want_out, want_vjp = jax.vjp(naive, *args)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-6, atol=1e-6)
  for got, want in zip(got_vjp(cotangent), want_vjp(cotangent), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _compiled_grad_hlo(impl):
  experts, weights = _assignments(8)

  def loss(x, weights):
    x_sorted, _, perm = pk.permute(x, jnp.asarray(experts), E, impl=impl)
    return jnp.sum(pk.unpermute(x_sorted, perm, weights, impl=impl))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return grad.lower(jnp.ones((T, D)), jnp.asarray(weights)).compile().as_text()


def test_xla_backward_is_gathers_not_scatter_adds():
  assert "scatter-add" in _compiled_grad_hlo("reference")  # what plain autodiff gives
  assert "scatter-add" not in _compiled_grad_hlo("xla")


def test_inverse_permutation():
  order = jnp.asarray(np.random.default_rng(6).permutation(50), jnp.int32)
  inv = pk.inverse_permutation(order)
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(inv)], np.arange(50))
  np.testing.assert_array_equal(inv, np.argsort(np.asarray(order)))


def test_bad_impl():
  with pytest.raises(ValueError, match="impl"):
    pk.permute(jnp.zeros((2, 3)), jnp.zeros((2, 1), jnp.int32), 4, impl="fast")
  # The pallas impl checks shapes as the others do, before any kernel is built.
  with pytest.raises(ValueError, match="T\\*K"):
    pk.unpermute(jnp.zeros((3, 3)), jnp.arange(3), jnp.ones((2, 1)), impl="pallas")
  with pytest.raises(ValueError, match="rows"):
    pk.permute(jnp.zeros((3, 3)), jnp.zeros((2, 1), jnp.int32), 4, impl="pallas")
