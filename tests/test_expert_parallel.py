"""Expert and data parallelism on 8 simulated CPU devices equal the 1-device computation.

For each mesh, one jitted function returns the logits and the gradients of the training loss
(forward and backward through the all_gather exchange), and the sharded train step runs 3 steps:
same losses, and the same aux-loss-free bias, which only batch-wide expert counts give.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from r1jax import sharding
from r1jax.config import ModelConfig
from r1jax.model import Transformer
from r1jax.train.step import LossConfig, loss_fn, make_init, make_train_step, on_mesh

# All four are `slow` (each compiles the whole train step again, ~1-2 min cold on 2 cores; CI
# runs them after the fast suite while its time budget allows). In the fast suite, expert
# parallelism is checked by tests/test_ep_export.py (the exchanges against one device, and the
# sharded step lowered for TPU and GPU) and tests/test_sharding.py.
MESHES = {
  "data8": pytest.param(dict(data=8), marks=pytest.mark.slow),
  "data2_expert4": pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow),
  "expert8": pytest.param(dict(expert=8), marks=pytest.mark.slow),
  "data2_fsdp2_expert2": pytest.param(dict(data=2, fsdp=2, expert=2), marks=pytest.mark.slow),
}
CFG = ModelConfig.from_preset("tiny")
MODEL = Transformer(CFG)
OPT = optax.adamw(3e-3)


def _batch():
  tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 16)).astype(np.int32)
  return jnp.asarray(tokens), jnp.ones((8, 16), jnp.int32)


def _logits_and_grads(state, tokens, mask):
  logits = MODEL.apply({"params": state.params, "router_bias": state.router_bias}, tokens)
  grads = jax.grad(lambda p: loss_fn(p, state.router_bias, MODEL, tokens, mask, LossConfig())[0])(
    state.params
  )
  return logits, grads


def _run(mesh):
  """(logits, grads, 3 losses) on `mesh` (None: one device)."""
  tokens, mask = _batch()
  state = make_init(MODEL, OPT, mesh)(jax.random.key(0), tokens)
  probe = on_mesh(jax.jit(_logits_and_grads), mesh, sharding.RULES["ep_fsdp"])
  logits, grads = probe(state, tokens, mask)
  step = make_train_step(MODEL, OPT, LossConfig(), mesh)
  losses = []
  for _ in range(3):
    state, metrics = step(state, tokens, mask)
    losses.append(float(metrics["loss"]))
  return np.asarray(logits), jax.tree.map(np.asarray, grads), losses, state


@pytest.fixture(scope="module")
def single_device():
  return _run(None)


def _rel(a, b):
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("sizes", list(MESHES.values()), ids=list(MESHES))
def test_sharded_logits_gradients_and_losses_equal_one_device(single_device, sizes):
  mesh = sharding.make_mesh(**sizes)
  logits, grads, losses, state = _run(mesh)
  ref_logits, ref_grads, ref_losses, ref_state = single_device
  assert _rel(logits, ref_logits) < 1e-5
  flat, ref_flat = traverse_util.flatten_dict(grads), traverse_util.flatten_dict(ref_grads)
  worst = max(_rel(flat[k], ref_flat[k]) for k in ref_flat)
  assert worst < 1e-5, worst
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[2] < losses[0]  # it trains
  # the expert weights really are split over the expert axis
  wi = state.params["moe_layers"]["moe"]["wi"]
  n = mesh.shape["expert"]
  assert {s.data.shape[1] for s in wi.addressable_shards} == {CFG.n_routed_experts // n}
  # The bias update reads the whole batch's expert counts, not one shard's: after 3 steps the
  # correction bias is the 1-device one exactly (the counts are integers).
  got = traverse_util.flatten_dict(state.router_bias)
  for key, want in traverse_util.flatten_dict(ref_state.router_bias).items():
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want), err_msg=str(key))
  assert any(np.any(np.asarray(b) != 0) for b in got.values())  # and it moved
