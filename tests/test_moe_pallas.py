"""The MoE block and the whole model with impl="pallas": exports for TPU and GPU, same training.

On CPU the kernels run in interpret mode; `jax.export` lowers the compiled kernels (Mosaic for
TPU, Triton for CUDA) without the hardware, which proves they build for those platforms.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from r1jax.config import ModelConfig
from r1jax.layers.moe import MoE
from r1jax.model import Transformer
from r1jax.train.step import LossConfig, make_init, make_train_step

CFG = ModelConfig.from_preset("tiny", moe_impl="pallas")
# Triton custom calls are not on jax.export's list of stable custom calls (jax 0.10.2).
KERNEL_CALL = {
  "tpu": ("tpu_custom_call", []),
  "cuda": ("__gpu$xla.gpu.triton", ["__gpu$xla.gpu.triton"]),
}


def _moe_loss_and_grads():
  moe = MoE(CFG)
  x = jnp.ones((2, 8, CFG.hidden_size), jnp.bfloat16)
  variables = jax.jit(moe.init)(jax.random.key(0), x)

  def loss(params, x):
    return jnp.sum(moe.apply({**variables, "params": params}, x).astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), variables["params"], x


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_moe_block_forward_and_backward_export(platform):
  fn, params, x = _moe_loss_and_grads()
  call, allowed = KERNEL_CALL[platform]
  checks = [export.DisabledSafetyCheck.custom_call(c) for c in allowed]
  exported = export.export(fn, platforms=(platform,), disabled_checks=checks)(params, x)
  text = exported.mlir_module()
  # router, permute metadata + gather, two grouped matmuls, combine; and their backward kernels
  assert text.count(call) >= 8, text.count(call)


@pytest.mark.slow
def test_train_step_with_pallas_equals_reference():
  """Two steps of the tiny model (interpret mode): same losses as the reference impl."""
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)), jnp.int32)
  mask = jnp.ones_like(tokens)
  losses = {}
  for impl in ("pallas", "reference"):
    model = Transformer(dataclasses.replace(CFG, moe_impl=impl))
    opt = optax.adamw(3e-3)
    state = make_init(model, opt)(jax.random.key(0), tokens)
    step = make_train_step(model, opt, LossConfig())
    losses[impl] = []
    for _ in range(2):
      state, metrics = step(state, tokens, mask)
      losses[impl].append(float(metrics["loss"]))
  np.testing.assert_allclose(losses["pallas"], losses["reference"], rtol=1e-5)
  assert losses["pallas"][1] < losses["pallas"][0]
