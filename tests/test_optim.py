"""r1jax.train.optim: the schedules against their formulas, the weight-decay masks, remat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.model import Transformer
from r1jax.train.loop import TrainConfig
from r1jax.train.optim import make_optimizer, make_schedule


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
  cfg = TrainConfig(
    num_steps=100,
    learning_rate=1.0,
    warmup_steps=10,
    lr_schedule="wsd",
    decay_fraction=0.2,
    end_lr_fraction=0.1,
  )
  lr = make_schedule(cfg)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert [float(lr(s)) for s in (10, 50, 79, 80)] == pytest.approx([1.0] * 4)
  assert float(lr(90)) == pytest.approx(1.0 - 0.9 * 10 / 20)
  assert float(lr(100)) == pytest.approx(0.1)


def test_cosine_and_constant_schedules():
  base = TrainConfig(num_steps=110, learning_rate=2.0, warmup_steps=10, end_lr_fraction=0.1)
  cosine = make_schedule(base)
  mid = 0.2 + (2.0 - 0.2) * 0.5 * (1 + np.cos(np.pi * 50 / 100))
  assert float(cosine(60)) == pytest.approx(mid, rel=1e-5)
  assert float(cosine(110)) == pytest.approx(0.2)
  constant = make_schedule(dataclasses.replace(base, lr_schedule="constant"))
  assert float(constant(5)) == pytest.approx(1.0) and float(constant(100)) == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["no_norms", "no_norms_embeddings", "all"])
def test_weight_decay_reaches_exactly_the_masked_params(kind):
  cfg = ModelConfig.from_preset("tiny", dtype="float32")
  variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  params = jax.tree.map(jnp.ones_like, meta.unbox(variables["params"]))
  train = TrainConfig(
    learning_rate=0.5,
    warmup_steps=0,
    lr_schedule="constant",
    weight_decay=0.1,
    weight_decay_mask=kind,
  )
  opt = make_optimizer(train)
  updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
  for path, u in traverse_util.flatten_dict(updates).items():
    norm, embedding = path[-1] == "scale", path in (("embed",), ("lm_head",))
    decayed = kind == "all" or not (norm or (kind == "no_norms_embeddings" and embedding))
    # Zero gradients: the update is the decay alone, -lr * wd * p.
    np.testing.assert_allclose(u, -0.05 if decayed else 0.0, err_msg="/".join(path))


def _mean_square_logits(model, params, router_bias, tokens):
  return jnp.mean(model.apply({"params": params, "router_bias": router_bias}, tokens) ** 2)


@functools.cache
def _remat_grads(remat: str, scan: bool):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  cfg = ModelConfig.from_preset(
    "tiny", dtype="float32", remat=remat, scan_layers=scan, num_nextn_predict_layers=0
  )
  model = Transformer(cfg)
  variables = meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))
  return jax.jit(jax.grad(_mean_square_logits, argnums=1), static_argnums=0)(
    model, variables["params"], variables["router_bias"], tokens
  )


@pytest.mark.parametrize(
  "remat, scan",
  [
    ("full", True),
    pytest.param("dots", True, marks=pytest.mark.slow),
    pytest.param("full", False, marks=pytest.mark.slow),
    pytest.param("dots", False, marks=pytest.mark.slow),
  ],
)
def test_remat_policies_give_the_same_gradients(remat, scan):
  got, want = _remat_grads(remat, scan), _remat_grads("none", scan)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_optimizer_fields_are_named():
  with pytest.raises(ValueError, match="^lr_schedule: unknown 'linear'"):
    TrainConfig(lr_schedule="linear")
  with pytest.raises(ValueError, match="^weight_decay_mask: unknown"):
    TrainConfig(weight_decay_mask="bias")
  with pytest.raises(ValueError, match=r"^decay_fraction: must be in \(0, 1\]"):
    TrainConfig(decay_fraction=0.0)
  with pytest.raises(ValueError, match="^remat: 'some'"):
    ModelConfig.from_preset("tiny", remat="some")
