"""One training step: LM + lambda * MTP + sequence balance loss, AdamW, aux-loss-free bias update.

The correction bias of every MoE layer ("router_bias" collection) is moved after the optimizer
step, outside the gradient, by gamma * sign(mean load - load) from the batch-wide expert counts
(DeepSeek-V3 section 2.1.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.linen import meta

from r1jax import sharding
from r1jax.model import Transformer
from r1jax.train.losses import lm_losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  router_bias: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  mtp_weight: float = 0.3  # lambda; V3 used 0.3, then 0.1 for the last 4.8T tokens.
  bias_update_speed: float = 1e-3  # gamma; 0 freezes the correction bias.
  loss_chunk: int = 0  # Sequence positions per cross-entropy chunk; 0: whole logits at once.
  router_z_weight: float = 0.0  # ST-MoE router z-loss weight (mean over MoE layers); 0: off.


def init_state(model: Transformer, tokens, optimizer: optax.GradientTransformation, rng):
  """Plain arrays (logical-axis boxes removed), so loaded weights can replace them as they are."""
  variables = meta.unbox(model.init(rng, tokens))
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    router_bias=variables.get("router_bias", {}),
    opt_state=optimizer.init(params),
  )


def loss_fn(
  params,
  router_bias,
  model: Transformer,
  tokens,
  mask,
  loss_cfg: LossConfig,
  positions=None,
  segment_ids=None,
):
  """Returns (total loss, metrics); metrics carry the per-layer expert load for the bias update.

  tokens, mask, positions, segment_ids: [b, s]; `mask` marks the tokens the loss counts as
  targets (None: all), `segment_ids` the documents of packed rows (see `r1jax.train.losses`).
  """
  variables = {"params": params}
  if router_bias:
    variables["router_bias"] = router_bias
  (h, mtp_h, head), stats = model.apply(
    variables, tokens, positions, segment_ids, method="features", mutable=["moe_stats"]
  )
  lm, mtp = lm_losses(h, mtp_h, head, tokens, mask, segment_ids, loss_cfg.loss_chunk)
  stats = traverse_util.flatten_dict(stats.get("moe_stats", {}))
  balance = sum(jnp.sum(v) for path, v in stats.items() if path[-1] == "balance_loss")
  total = lm + loss_cfg.mtp_weight * mtp + balance
  metrics = {"loss": total, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance}
  router_z = [v.reshape(-1) for path, v in stats.items() if path[-1] == "router_z"]
  if router_z:  # every MoE layer, the MTP modules' included
    metrics["router_z_loss"] = jnp.mean(jnp.concatenate(router_z))
    total = total + loss_cfg.router_z_weight * metrics["router_z_loss"]
    metrics["loss"] = total
  # Per-layer expert load, keyed by the MoE module's path (as the router bias is).
  load = {path[:-1]: v for path, v in stats.items() if path[-1] == "expert_load"}
  return total, (metrics, load)


def load_balance_metrics(expert_load) -> dict[str, jax.Array]:
  """Worst layer's max/mean expert load, and the mean over layers of the load's coefficient of
  variation (std/mean); 1 and 0 mean perfectly balanced. Empty for a model without MoE."""
  if not expert_load:
    return {}
  per_layer = jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in expert_load.values()])
  mean = jnp.mean(per_layer, axis=-1)
  ratio = jnp.max(per_layer, axis=-1) / mean
  return {
    "load_max_mean": jnp.max(ratio),
    "load_cv": jnp.mean(jnp.std(per_layer, axis=-1) / mean),
    "load_max_mean_layers": ratio,  # [MoE layers], in the order of the router-bias tree
  }


def update_router_bias(router_bias, expert_load, speed: float):
  """b_i += gamma * sign(mean_i(c) - c_i) for every MoE layer.

  router_bias is the nested "router_bias" collection; expert_load maps each MoE module's path to
  its load [..., E] (stacked layers keep their leading axis).
  """
  if not router_bias or speed == 0.0:
    return router_bias
  moved = {}
  for path, bias in traverse_util.flatten_dict(router_bias).items():
    load = expert_load[path[:-1]]
    moved[path] = bias + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return traverse_util.unflatten_dict(moved)


def state_shardings(model: Transformer, optimizer, mesh, rules: sharding.AxisRules) -> TrainState:
  """A TrainState of NamedShardings: params by the rules, Adam moments like their params."""
  ps = sharding.param_shardings(model.cfg, mesh, rules)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda t: init_state(model, t, optimizer, jax.random.key(0)), tokens)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return TrainState(
    step=replicated,
    params=ps["params"],
    router_bias=ps.get("router_bias", {}),
    opt_state=sharding.tree_shardings(abstract.opt_state, ps["params"], mesh),
  )


def on_mesh(fn, mesh, rules: sharding.AxisRules | None):
  """Runs fn with `mesh` and the rules in context (what the model's constraints and the
  expert-parallel adapter read while tracing); without a mesh, fn as is."""
  if mesh is None:
    return fn

  def run(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.as_flax()):
      return fn(*args)

  run.wrapped = fn  # e.g. the jitted step, for jax.export under the same context
  return run


def make_init(model: Transformer, optimizer, mesh=None, rules=None):
  """A jitted (rng, tokens) -> TrainState, created directly in its shardings on a mesh."""
  init = lambda rng, tokens: init_state(model, tokens, optimizer, rng)  # noqa: E731
  if mesh is None:
    return jax.jit(init)
  rules = rules or sharding.RULES["ep_fsdp"]
  return on_mesh(
    jax.jit(init, out_shardings=state_shardings(model, optimizer, mesh, rules)), mesh, rules
  )


def make_train_step(
  model: Transformer,
  optimizer,
  loss_cfg: LossConfig = LossConfig(),
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.AxisRules | None = None,
):
  """A jitted (state, tokens, mask, positions=None, segment_ids=None) -> (state, metrics); on a
  mesh, sharded by `rules`. The batch arguments are [b, s] as `loss_fn` takes them."""

  def step(state: TrainState, tokens, mask, positions=None, segment_ids=None):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, load)), grads = grad_fn(
      state.params, state.router_bias, model, tokens, mask, loss_cfg, positions, segment_ids
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bias = update_router_bias(state.router_bias, load, loss_cfg.bias_update_speed)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics.update(load_balance_metrics(load))
    new = state.replace(step=state.step + 1, params=params, router_bias=bias, opt_state=opt_state)
    return new, metrics

  if mesh is None:
    return jax.jit(step)
  rules = rules or sharding.RULES["ep_fsdp"]
  states = state_shardings(model, optimizer, mesh, rules)
  batch = sharding.batch_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(
    step, in_shardings=(states, batch, batch, batch, batch), out_shardings=(states, replicated)
  )

  def call(state, tokens, mask, positions=None, segment_ids=None):
    return jitted(state, tokens, mask, positions, segment_ids)  # pjit wants every argument

  stepper = on_mesh(call, mesh, rules)
  stepper.wrapped = jitted  # (state, tokens, mask, positions, segment_ids): for jax.export
  return stepper
