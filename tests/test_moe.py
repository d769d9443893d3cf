"""MoE block: routing vs a numpy gate; the block vs a dense all-experts reference (every impl)."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig
from r1jax.layers.moe import MoE, route_tokens, sequence_balance_loss
from tests.references import np_route


def _gate_kwargs(cfg):
  return dict(
    top_k=cfg.num_experts_per_tok,
    score_func=cfg.score_func,
    n_group=cfg.n_group,
    topk_group=cfg.topk_group,
    group_score=cfg.group_score,
    norm=cfg.norm_topk_prob,
    scale=cfg.routed_scaling_factor,
  )


@pytest.mark.parametrize("preset", ["v3_671b", "v2_lite"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routing_matches_numpy_gate(preset, seed):
  """V3: sigmoid, bias, 8 groups keep 4 (top-2 sum), top-8, renorm, x2.5. V2: softmax top-6."""
  cfg = ModelConfig.from_preset(preset)
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((64, cfg.n_routed_experts)).astype(np.float32)
  bias = rng.standard_normal(cfg.n_routed_experts).astype(np.float32) * 0.3
  bias = bias if cfg.use_correction_bias else None
  weights, experts, _ = route_tokens(jnp.asarray(logits), bias, cfg)
  want_w, want_e = np_route(logits, bias, **_gate_kwargs(cfg))
  np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(want_e, -1))
  order = lambda e, w: np.take_along_axis(w, np.argsort(e, -1), -1)
  np.testing.assert_allclose(
    order(np.asarray(experts), np.asarray(weights)), order(want_e, want_w), rtol=1e-5
  )
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(np.asarray(weights).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


def test_bias_changes_selection_but_not_weights():
  cfg = ModelConfig.from_preset("v3_671b")
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.standard_normal((32, 256)).astype(np.float32))
  bias = jnp.zeros(256).at[:16].set(5.0)  # Pushes experts 0..15 (groups 0 and 1) into every top-k.
  w0, e0, _ = route_tokens(logits, jnp.zeros(256), cfg)
  w1, e1, _ = route_tokens(logits, bias, cfg)
  assert not np.array_equal(np.sort(e0, -1), np.sort(e1, -1))
  assert np.all(np.asarray(e1) < 16)
  s = jax.nn.sigmoid(logits)
  chosen = jnp.take_along_axis(s, e1, -1)
  np.testing.assert_allclose(w1, chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)


def _dense_moe(params, bias, x, cfg):
  """Every expert on every token, combined with a dense [T, E] routing-weight matrix."""
  p = flax.linen.meta.unbox(params)
  b, s, m = x.shape
  tokens = x.reshape(b * s, m)
  logits = tokens @ p["gate"]
  sel_logits = np.asarray(jax.lax.stop_gradient(logits))
  _, experts = np_route(sel_logits, bias, **_gate_kwargs(cfg))
  scores = jax.nn.sigmoid(logits) if cfg.score_func == "sigmoid" else jax.nn.softmax(logits, -1)
  w = jnp.take_along_axis(scores, jnp.asarray(experts), -1)
  if cfg.norm_topk_prob:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  w = w * cfg.routed_scaling_factor
  dense_w = jnp.zeros((b * s, cfg.n_routed_experts)).at[jnp.arange(b * s)[:, None], experts].add(w)
  h = jnp.einsum("tm,emgf->tegf", tokens, p["wi"])
  y = jnp.einsum("tef,efm->tem", jax.nn.silu(h[:, :, 0]) * h[:, :, 1], p["wo"])
  out = jnp.einsum("tem,te->tm", y, dense_w)
  if cfg.n_shared_experts:
    sh = p["shared_experts"]
    hs = jnp.einsum("tm,mgf->tgf", tokens, sh["wi"])
    out = out + (jax.nn.silu(hs[:, 0]) * hs[:, 1]) @ sh["wo"]
  return out.reshape(b, s, m)


MOE_CONFIGS = {
  "v3_like": ModelConfig.from_preset(
    "tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4
  ),
  "v2_like": ModelConfig.from_preset(
    "tiny",
    score_func="softmax",
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_shared_experts=2,
  ),
  "v2_236b_like": ModelConfig.from_preset(
    "tiny",
    score_func="softmax",
    topk_method="group_limited_greedy",
    n_group=4,
    topk_group=2,
    norm_topk_prob=False,
    routed_scaling_factor=16.0,
    n_shared_experts=0,
  ),
}


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_moe_block_equals_dense_reference_forward_and_grads(name, impl):
  cfg = dataclasses.replace(MOE_CONFIGS[name], moe_impl=impl)
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.hidden_size))
  block = MoE(cfg)
  variables = jax.jit(block.init)(jax.random.key(1), x)
  params = variables["params"]
  bias = None
  if cfg.use_correction_bias:
    bias = jax.random.normal(jax.random.key(2), (cfg.n_routed_experts,)) * 0.1
    variables = {**variables, "router_bias": {"correction_bias": bias}}
    bias = np.asarray(bias)
  extra = {k: v for k, v in variables.items() if k not in ("params", "moe_stats")}

  def ours(p, x):
    return jnp.sum(jnp.sin(block.apply({"params": p, **extra}, x)))

  def dense(p, x):
    return jnp.sum(jnp.sin(_dense_moe(p, bias, x, cfg)))

  out = jax.jit(block.apply)({"params": params, **extra}, x)
  want = _dense_moe(params, bias, x, cfg)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  got_g = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, x)
  want_g = jax.grad(dense, argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()) + 1e-12)


def test_capacity_factor_one_token_per_expert_drops_the_rest():
  """With capacity 1 per expert, only each expert's first assignment in token order survives."""
  cfg = ModelConfig.from_preset("tiny", n_shared_experts=0)
  x = jax.random.normal(jax.random.key(4), (1, 16, cfg.hidden_size))
  variables = jax.jit(MoE(cfg).init)(jax.random.key(5), x)
  tight = dataclasses.replace(
    cfg, capacity_factor=cfg.n_routed_experts / (16 * cfg.num_experts_per_tok)
  )
  loose = dataclasses.replace(cfg, capacity_factor=100.0)
  dropless = jax.jit(MoE(cfg).apply)(variables, x)
  loose_out = jax.jit(MoE(loose).apply)(variables, x)
  np.testing.assert_allclose(loose_out, dropless, rtol=1e-6, atol=1e-7)
  dropped = jax.jit(MoE(tight).apply)(variables, x)
  p = variables["params"]
  logits = np.asarray(x[0] @ p["gate"].value)
  bias = np.asarray(variables["router_bias"]["correction_bias"])
  w, e = np_route(logits, bias, **_gate_kwargs(cfg))
  seen, keep = set(), np.zeros_like(w, bool)
  for t in range(16):
    for k in range(cfg.num_experts_per_tok):
      if e[t, k] not in seen:
        seen.add(e[t, k])
        keep[t, k] = True
  dense_w = np.zeros((16, cfg.n_routed_experts))
  np.put_along_axis(dense_w, e, np.where(keep, w, 0.0), -1)
  wi, wo = np.asarray(p["wi"].value, np.float64), np.asarray(p["wo"].value, np.float64)
  h = np.einsum("tm,emgf->tegf", np.asarray(x[0], np.float64), wi)
  act = h[:, :, 0] / (1 + np.exp(-h[:, :, 0])) * h[:, :, 1]
  want = np.einsum("tem,te->tm", np.einsum("tef,efm->tem", act, wo), dense_w)
  np.testing.assert_allclose(np.asarray(dropped[0]), want, rtol=1e-4, atol=1e-6)


def test_sequence_balance_loss_matches_the_formula():
  rng = np.random.default_rng(3)
  b, s, e, k = 2, 6, 8, 2
  scores = rng.random((b * s, e)).astype(np.float32)
  experts = np.stack([rng.choice(e, k, replace=False) for _ in range(b * s)]).astype(np.int32)
  want = 0.0
  for i in range(b):
    sl = slice(i * s, (i + 1) * s)
    f = np.bincount(experts[sl].ravel(), minlength=e) * e / (k * s)
    p = (scores[sl] / scores[sl].sum(-1, keepdims=True)).mean(0)
    want += (f * p).sum() / b
  got = sequence_balance_loss(jnp.asarray(scores), jnp.asarray(experts), e, b)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_routing_collection_records_each_tokens_experts_and_changes_nothing():
  """The opt-in "routing" collection: ids whose histogram is moe_stats' expert load, weights
  renormalised as configured, and logits identical to a plain apply."""
  from r1jax import Transformer

  cfg = ModelConfig.from_preset("tiny")
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  logits, state = model.apply(variables, tokens, mutable=["routing", "moe_stats"])
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.apply(variables, tokens)))
  routing = state["routing"]["moe_layers"]["moe"]
  load = state["moe_stats"]["moe_layers"]["moe"]["expert_load"]
  ids, weights = np.asarray(routing["expert_ids"]), np.asarray(routing["weights"])
  n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
  assert ids.shape == (n_moe, 2, 8, cfg.num_experts_per_tok) == weights.shape
  for layer in range(n_moe):
    counts = np.bincount(ids[layer].ravel(), minlength=cfg.n_routed_experts)
    np.testing.assert_array_equal(counts, np.asarray(load[layer]))
  if cfg.norm_topk_prob:
    np.testing.assert_allclose(weights.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
