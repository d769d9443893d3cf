"""The sharded train step and the ragged_all_to_all exchange, without the hardware they need.

- `jax.export` lowers the sharded train step for TPU (Pallas kernels inside the shard_map) and,
  with the ragged_all_to_all exchange, for TPU and CUDA.
- XLA:CPU has no ragged_all_to_all, so its logic (offsets, counts, the regrouping of received
  rows) is checked numerically against the 1-device result with an emulation of the collective
  built from all_gather: same formula for every output row, exact in float32.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export, lax

from r1jax import expert_parallel, sharding
from r1jax.config import ModelConfig
from r1jax.layers.experts import routed_experts
from r1jax.model import Transformer
from r1jax.train.step import LossConfig, make_init, make_train_step

TPU_OK = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
CUDA_OK = TPU_OK + [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _exported_step(platform, **overrides):
  cfg = ModelConfig.from_preset("tiny", **overrides)
  model, opt = Transformer(cfg), optax.adamw(1e-3)
  mesh = sharding.make_mesh(data=2, expert=4)
  rules = sharding.RULES["ep_fsdp"]
  tokens = jnp.zeros((8, 16), jnp.int32)
  state = make_init(model, opt, mesh, rules)(jax.random.key(0), tokens)
  step = make_train_step(model, opt, LossConfig(), mesh, rules)
  checks = TPU_OK if platform == "tpu" else CUDA_OK
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules.as_flax()):
    exported = export.export(step.wrapped, platforms=(platform,), disabled_checks=checks)(
      state, tokens, tokens, None, None
    )
  return exported.mlir_module()


def test_sharded_train_step_with_pallas_kernels_lowers_for_tpu():
  text = _exported_step("tpu", moe_impl="pallas")
  assert "tpu_custom_call" in text  # the Mosaic kernels
  assert "all-gather" in text or "all_gather" in text  # the expert exchange
  assert "mhlo.sharding" in text or "sdy.sharding" in text  # and the shardings


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_all_to_all_exchange_lowers(platform):
  text = _exported_step(platform, moe_impl="xla", expert_exchange="ragged_all_to_all")
  assert "ragged_all_to_all" in text


def _emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
  """lax.ragged_all_to_all's definition, from all_gather: row r of the output comes from the
  source whose slice [output_offsets[src][me], + send_sizes[src][me]) holds r."""
  del recv_sizes
  me = lax.axis_index(axis_name)
  ops = lax.all_gather(operand, axis_name)  # [n, R, m]
  starts_in = lax.all_gather(input_offsets, axis_name)[:, me]  # [n]
  sizes = lax.all_gather(send_sizes, axis_name)[:, me]
  starts_out = lax.all_gather(output_offsets, axis_name)[:, me]
  rows = jnp.arange(output.shape[0])[:, None]
  inside = (rows >= starts_out) & (rows < starts_out + sizes)  # [rows, n]
  src_row = jnp.clip(starts_in + rows - starts_out, 0, operand.shape[0] - 1)
  picked = ops[jnp.arange(ops.shape[0])[None, :], src_row]  # [rows, n, m]
  got = jnp.sum(jnp.where(inside[..., None], picked, 0), axis=1)
  return jnp.where(jnp.any(inside, axis=1)[:, None], got, output)


@pytest.mark.parametrize("sizes", [dict(expert=4, data=2), dict(expert=8)])
def test_ragged_exchange_equals_one_device(monkeypatch, sizes):
  monkeypatch.setattr(lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  rng = np.random.RandomState(0)
  t, d, f, e, k = 64, 16, 8, 8, 2
  x = jnp.asarray(rng.randn(t, d), jnp.float32)
  experts = jnp.asarray(np.argsort(rng.rand(t, e), axis=1)[:, :k], jnp.int32)
  experts = experts.at[:20].set(jnp.array([3, 5]))  # an expert (and a shard) with many tokens
  weights = jnp.asarray(rng.rand(t, k), jnp.float32)
  wi = jnp.asarray(rng.randn(e, d, 2 * f) * 0.3, jnp.float32)
  wo = jnp.asarray(rng.randn(e, f, d) * 0.3, jnp.float32)

  def loss(fn, x, weights, wi, wo):
    return jnp.sum(fn(x, weights, experts, wi, wo) ** 2)

  def ragged(*args):
    return expert_parallel.routed_experts(*args, impl="xla", exchange="ragged_all_to_all")

  want = jax.jit(jax.value_and_grad(lambda *a: loss(routed_experts, *a), argnums=(0, 1, 2, 3)))(
    x, weights, wi, wo
  )
  mesh = sharding.make_mesh(**sizes)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(lambda *a: loss(ragged, *a), argnums=(0, 1, 2, 3)))(
      x, weights, wi, wo
    )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-5)


def test_exchanges_are_validated():
  with pytest.raises(ValueError, match="expert_exchange: 'ring'"):
    dataclasses.replace(ModelConfig.from_preset("tiny"), expert_exchange="ring")
