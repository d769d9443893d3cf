"""route() against an independent float64 numpy gate written from the DeepSeek-V2/V3 semantics.

Dims: T tokens, E experts, K top-k, G groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from tests.references import np_route

T = 32


def _logits(e, seed):
  """Random normal logits: continuous, so no ties (np_route checks for near-ties)."""
  return np.random.default_rng(seed).standard_normal((T, e)).astype(np.float32)


V3 = dict(
  top_k=8,
  score_func="sigmoid",
  n_group=8,
  topk_group=4,
  group_score="top2sum",
  norm=True,
  scale=2.5,
)
V2_LITE = dict(
  top_k=6, score_func="softmax", n_group=1, topk_group=1, group_score="max", norm=False, scale=1.0
)
V2_236B = dict(
  top_k=6, score_func="softmax", n_group=8, topk_group=3, group_score="max", norm=False, scale=16.0
)
SETTINGS = {
  "v3": (V3, 256, True),
  "v2_lite": (V2_LITE, 64, False),
  "v2_236b": (V2_236B, 160, False),
}


def _route(logits, bias, cfg, impl):
  return pk.route(
    jnp.asarray(logits),
    None if bias is None else jnp.asarray(bias),
    top_k=cfg["top_k"],
    score_func=cfg["score_func"],
    n_group=cfg["n_group"],
    topk_group=cfg["topk_group"],
    group_score=cfg["group_score"],
    norm_topk_prob=cfg["norm"],
    routed_scaling_factor=cfg["scale"],
    impl=impl,
  )


@pytest.mark.parametrize("impl", ["xla", "reference", "auto", "pallas"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_route_matches_numpy_gate(setting, impl):
  cfg, e, with_bias = SETTINGS[setting]
  logits = _logits(e, seed=0)
  bias = np.random.default_rng(1).uniform(-0.05, 0.05, e).astype(np.float32) if with_bias else None
  weights, experts = _route(logits, bias, cfg, impl)
  want_w, want_e = np_route(logits, bias, **cfg)
  assert weights.dtype == jnp.float32 and experts.dtype == jnp.int32
  np.testing.assert_array_equal(experts, want_e)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6)


def test_bias_changes_selection_not_weights():
  cfg, e = V3, 256
  logits = _logits(e, seed=2)
  bias = np.zeros(e, np.float32)
  bias[::3] = np.random.default_rng(3).uniform(0.3, 0.6, len(bias[::3]))  # favours every third
  w0, e0 = _route(logits, None, cfg, "xla")
  w1, e1 = _route(logits, bias, cfg, "xla")
  assert not np.array_equal(e0, e1)
  assert np.mean(np.asarray(e1) % 3 == 0) > np.mean(np.asarray(e0) % 3 == 0)
  # Weights are the unbiased sigmoid scores at the chosen experts, renormalised and scaled.
  s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  chosen = np.take_along_axis(s, np.asarray(e1), axis=-1)
  np.testing.assert_allclose(w1, chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)
  np.testing.assert_array_equal(e1, np_route(logits, bias, **cfg)[1])


def test_group_limit_keeps_experts_in_best_groups():
  cfg, e = V2_236B, 160
  _, experts = _route(_logits(e, seed=3), None, cfg, "xla")
  groups_used = np.asarray(experts) // (e // cfg["n_group"])
  assert max(len(set(row)) for row in groups_used) <= cfg["topk_group"]


def test_router_scores_and_jit():
  logits = _logits(64, seed=4)
  np.testing.assert_allclose(
    pk.router_scores(jnp.asarray(logits), "softmax"), jax.nn.softmax(logits, axis=-1), rtol=1e-6
  )
  s = pk.router_scores(jnp.asarray(logits), "sigmoid")
  np.testing.assert_allclose(s, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), rtol=1e-6)
  jitted = jax.jit(lambda z: _route(z, None, V2_LITE, "xla"))
  np.testing.assert_array_equal(jitted(logits)[1], np_route(logits, None, **V2_LITE)[1])


def test_weights_are_differentiable_in_logits():
  logits = jnp.asarray(_logits(64, seed=5))
  grad = jax.grad(lambda z: jnp.sum(_route(z, None, V2_LITE, "xla")[0]))(logits)
  # d(softmax at the chosen experts) is nonzero only through s: finite and not all zero.
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_bad_arguments():
  logits = jnp.zeros((4, 16))
  with pytest.raises(ValueError, match="impl"):
    pk.route(logits, None, top_k=2, impl="gpu")
  # The pallas impl checks its arguments as the others do, before any kernel is built.
  with pytest.raises(ValueError, match="top_k"):
    pk.route(logits, None, top_k=17, impl="pallas")
  with pytest.raises(ValueError, match="topk_group"):
    pk.route(logits, None, top_k=8, n_group=4, topk_group=1, impl="pallas")
  with pytest.raises(ValueError, match="score_func"):
    pk.route(logits, None, top_k=2, score_func="relu")
  with pytest.raises(ValueError, match="n_group"):
    pk.route(logits, None, top_k=2, n_group=3)
  with pytest.raises(ValueError, match="top_k"):
    pk.route(logits, None, top_k=17)
