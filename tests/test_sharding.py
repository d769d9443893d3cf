"""r1jax.sharding: mesh parsing and checks, the rules table, golden PartitionSpecs for `tiny`.

The golden file pins every parameter's PartitionSpec under each rules preset on a
fsdp=2, expert=2, tensor=2 mesh. After an intended change, regenerate it with
    R1JAX_REGEN_GOLDEN=1 python -m pytest tests/test_sharding.py
and review the diff.
"""

import json
import os

import jax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from r1jax import sharding
from r1jax.config import ModelConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs_tiny.json")
GOLDEN_MESH = dict(data=1, fsdp=2, expert=2, tensor=2)


def test_eight_simulated_devices():
  assert jax.device_count() == 8  # tests/conftest.py sets the XLA flag


def test_parse_mesh_fills_unnamed_axes_with_one():
  assert sharding.parse_mesh("fsdp=-1, expert=8") == dict(data=1, fsdp=-1, expert=8, tensor=1)
  assert sharding.parse_mesh("") == dict(data=1, fsdp=1, expert=1, tensor=1)


@pytest.mark.parametrize(
  "text, message",
  [
    ("pipeline=2", "'pipeline=2' is not AXIS=SIZE"),
    ("data", "'data' is not AXIS=SIZE"),
    ("data=two", "size of data must be an integer"),
  ],
)
def test_parse_mesh_errors_name_the_entry(text, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_mesh(text)


def test_rest_axis_takes_the_remaining_devices():
  shape = sharding.resolve_mesh_shape(dict(data=2, fsdp=-1, expert=2), 8)
  assert shape == dict(data=2, fsdp=2, expert=2, tensor=1)


@pytest.mark.parametrize(
  "sizes, message",
  [
    (dict(data=4, expert=4), "needs 16 devices but 8 are present"),
    (dict(data=3, fsdp=-1), "take 3 devices, which does not divide the 8"),
    (dict(data=-1, fsdp=-1), "-1 for both data and fsdp"),
    (dict(data=0), "data=0"),
    (dict(pipe=2), "unknown axis 'pipe'"),
  ],
)
def test_bad_meshes_fail_before_compile(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_mesh_shape(sizes, 8)
  if "pipe" not in sizes:
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(**sizes)


def test_make_mesh_names_the_four_axes():
  mesh = sharding.make_mesh(data=2, fsdp=-1, expert=2)
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == dict(data=2, fsdp=2, expert=2, tensor=1)
  one = sharding.make_mesh()
  assert one.devices.size == 1


def test_rules_reject_unknown_axes():
  with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
    sharding.AxisRules("x", (("embedding", ("fsdp",)),))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.AxisRules("x", (("embed", ("model",)),))


def test_a_mesh_axis_shards_one_dim_only():
  mesh = sharding.abstract_mesh(GOLDEN_MESH)
  rules = sharding.RULES["ep_fsdp"]
  # routed expert weights: the expert dim takes `expert`, embed keeps only fsdp
  spec = sharding.logical_to_spec(
    ("layers", "expert", "embed", None, "mlp"), (2, 8, 64, 2, 32), rules, mesh
  )
  assert spec == P(None, "expert", "fsdp", None, "tensor")
  # dense weights: embed over fsdp x expert
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 32), rules, mesh) == P(
    ("fsdp", "expert"), "tensor"
  )


def test_size_one_mesh_axes_are_dropped():
  mesh = sharding.abstract_mesh(dict(fsdp=4))
  spec = sharding.logical_to_spec(("embed", "mlp"), (64, 32), sharding.RULES["ep_fsdp"], mesh)
  assert spec == P("fsdp", None)


def test_indivisible_dim_is_named():
  mesh = sharding.abstract_mesh(dict(tensor=8))
  with pytest.raises(ValueError, match=r"wq_b: dim 2 \(heads, size 4\) is not divisible .* = 8"):
    sharding.logical_to_spec(
      ("layers", "q_lora", "heads", "head_dim"),
      (2, 32, 4, 24),
      sharding.RULES["fsdp"],
      mesh,
      name="wq_b",
    )


def test_expert_axis_must_divide_the_experts():
  cfg = ModelConfig.from_preset("tiny")
  mesh = sharding.abstract_mesh(dict(expert=3))
  with pytest.raises(ValueError, match="expert=3 does not divide n_routed_experts=8"):
    sharding.param_specs(cfg, mesh, sharding.RULES["ep_fsdp"])


def _specs_as_json(cfg, rules):
  mesh = sharding.abstract_mesh(GOLDEN_MESH)
  flat = traverse_util.flatten_dict(sharding.param_specs(cfg, mesh, rules))
  return {
    "/".join(k): [list(a) if isinstance(a, tuple) else a for a in v]
    for k, v in sorted(flat.items())
  }


def test_golden_partition_specs_of_tiny():
  cfg = ModelConfig.from_preset("tiny")
  got = {name: _specs_as_json(cfg, rules) for name, rules in sharding.RULES.items()}
  if os.environ.get("R1JAX_REGEN_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert got == golden


def test_sharded_decode_cache_gives_the_same_logits():
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np

  from r1jax.model import Transformer

  cfg = ModelConfig.from_preset("tiny")
  decoder = Transformer(cfg, decode=True)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 4)), jnp.int32)
  variables = jax.jit(decoder.init)(jax.random.key(0), jnp.zeros((8, 16), jnp.int32))
  params = {"params": variables["params"], "router_bias": variables["router_bias"]}
  step = jax.jit(lambda v, t: decoder.apply(v, t, mutable=["cache"]))
  want, _ = step({**params, "cache": variables["cache"]}, tokens)

  mesh = sharding.make_mesh(data=2, expert=4)
  rules = sharding.RULES["ep_fsdp"]
  cache = jax.device_put(
    variables["cache"], sharding.cache_shardings(variables["cache"], mesh, rules)
  )
  latent = cache["moe_layers"]["attn"]["latent"]  # [layers, b, t, c]
  assert latent.sharding.spec == P(None, ("data", "expert"), None, None)
  assert {s.data.shape[1] for s in latent.addressable_shards} == {1}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules.as_flax()):
    got, updated = jax.jit(lambda v, t: decoder.apply(v, t, mutable=["cache"]))(
      {**params, "cache": cache}, tokens
    )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert int(updated["cache"]["moe_layers"]["attn"]["index"][0]) == 4
