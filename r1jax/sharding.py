"""Device meshes and the logical-axis rules that place r1jax's params and activations on them.

Mesh axes (any may be 1): `data` (pure data parallel), `fsdp` (data parallel with params,
gradients and optimizer state sharded), `expert` (routed experts sharded; tokens exchanged inside
`shard_map`), `tensor` (heads, ffn width and vocabulary split).

The model names only logical axes (`r1jax.layers.common`: vocab, embed, q_lora, kv_lora, heads,
head_dim, mlp, expert, layers; batch and length for activations). An `AxisRules` table maps each
logical axis to mesh axes. Three presets:

  fsdp      embed (and the MLA latents q_lora, kv_lora) over fsdp; experts replicated.
  ep_fsdp   experts over expert; embed, q_lora and kv_lora over fsdp x expert, so the expert
            axis also shards the dense weights (as MaxText does for DeepSeek).
  ep_as_dp  experts over expert; the dense weights as under fsdp, replicated over expert (the
            expert axis is plain data parallelism outside the MoE layers).

The batch goes over data x fsdp x expert in all three.

In all three heads, mlp and vocab go over `tensor`. A mesh axis is used at most once per
array: when two dims of one weight map to the same mesh axis (expert and embed in a routed
expert's weights under ep_fsdp) the first dim keeps it.

Usage:
    mesh = make_mesh(**parse_mesh("data=1,fsdp=-1,expert=2"))
    shardings = param_shardings(cfg, mesh, RULES["ep_fsdp"])  # {"params": ..., "router_bias": ...}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from r1jax.config import ModelConfig
from r1jax.model import Transformer

MESH_AXES = ("data", "fsdp", "expert", "tensor")
LOGICAL_AXES = (
  "vocab",
  "embed",
  "q_lora",
  "kv_lora",
  "heads",
  "head_dim",
  "mlp",
  "expert",
  "layers",
  "batch",
  "length",
)
_BATCH = ("data", "fsdp", "expert")


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical axis -> mesh axes. Logical axes not listed are replicated.

  Attributes:
    name: the preset's name (recorded in run records).
    rules: (logical axis, mesh axes) pairs; mesh axes is a tuple, empty for replicated.
  """

  name: str
  rules: tuple[tuple[str, tuple[str, ...]], ...]

  def __post_init__(self):
    for logical, mesh_axes in self.rules:
      if logical not in LOGICAL_AXES:
        raise ValueError(
          f"rules {self.name}: unknown logical axis {logical!r}; known: {', '.join(LOGICAL_AXES)}"
        )
      unknown = [a for a in mesh_axes if a not in MESH_AXES]
      if unknown:
        raise ValueError(
          f"rules {self.name}: unknown mesh axis {unknown[0]!r} for {logical!r}; "
          f"mesh axes are {', '.join(MESH_AXES)}"
        )

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    return dict(self.rules).get(logical, ()) if logical else ()

  def as_flax(self) -> list[tuple[str, Any]]:
    """The table in the form `nn.logical_axis_rules` takes, for activation constraints."""
    return [(logical, axes if axes else None) for logical, axes in self.rules]


def _rules(name: str, embed: tuple[str, ...], expert: tuple[str, ...]) -> AxisRules:
  return AxisRules(
    name,
    (
      ("batch", _BATCH),
      ("embed", embed),
      ("q_lora", embed),
      ("kv_lora", embed),
      ("expert", expert),
      ("heads", ("tensor",)),
      ("mlp", ("tensor",)),
      ("vocab", ("tensor",)),
    ),
  )


RULES: Mapping[str, AxisRules] = {
  "fsdp": _rules("fsdp", embed=("fsdp",), expert=()),
  "ep_fsdp": _rules("ep_fsdp", embed=("fsdp", "expert"), expert=("expert",)),
  "ep_as_dp": _rules("ep_as_dp", embed=("fsdp",), expert=("expert",)),
}


# --------------------------------------------------------------------------- meshes
def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1,expert=8' -> {'data': 1, 'fsdp': -1, 'expert': 8}; unnamed axes are 1.

  Raises:
    ValueError: `--mesh: ...` naming the bad entry.
  """
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise ValueError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh: size of {name} must be an integer, got {value!r}") from None
  return sizes


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in a -1 axis ("the rest") and checks the mesh against the device count.

  Args:
    sizes: mesh axis -> size (>= 1, or -1 for at most one axis); missing axes are 1.
    num_devices: devices available.

  Returns:
    {axis: size} for every mesh axis, in MESH_AXES order.

  Raises:
    ValueError: one line naming the axis or the device count.
  """
  unknown = [a for a in sizes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"--mesh: unknown axis {unknown[0]!r}; mesh axes are {', '.join(MESH_AXES)}")
  shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  rest = [a for a, n in shape.items() if n == -1]
  bad = [a for a, n in shape.items() if n < 1 and n != -1]
  if bad or len(rest) > 1:
    what = f"{bad[0]}={shape[bad[0]]}" if bad else f"-1 for both {rest[0]} and {rest[1]}"
    raise ValueError(f"--mesh: {what}; sizes must be >= 1, with -1 on at most one axis")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if rest:
    if num_devices % fixed:
      raise ValueError(
        f"--mesh: the fixed axes take {fixed} devices, which does not divide the {num_devices} "
        f"devices present, so {rest[0]}=-1 has no size"
      )
    shape[rest[0]] = num_devices // fixed
  total = math.prod(shape.values())
  if total > num_devices:
    raise ValueError(
      f"--mesh: {_describe(shape)} needs {total} devices but {num_devices} are present; "
      "shrink an axis or use -1"
    )
  return shape


def _describe(shape: Mapping[str, int]) -> str:
  return ",".join(f"{a}={n}" for a, n in shape.items())


def make_mesh(
  data: int = 1,
  fsdp: int = 1,
  expert: int = 1,
  tensor: int = 1,
  *,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """A Mesh with axes (data, fsdp, expert, tensor); one size may be -1 ("the rest").

  A mesh smaller than the devices present takes the first devices (tests compare a 1-device
  mesh with an 8-device one in the same process).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor), len(devices))
  n = math.prod(shape.values())
  grid = np.asarray(devices[:n], dtype=object).reshape(tuple(shape.values()))
  return Mesh(grid, MESH_AXES)


def abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
  """A device-free mesh of the given sizes, for planning with `jax.eval_shape`."""
  shape = resolve_mesh_shape(sizes, math.prod(max(n, 1) for n in sizes.values()))
  return jax.sharding.AbstractMesh(tuple(shape.values()), MESH_AXES)


# --------------------------------------------------------------------------- specs
def logical_to_spec(
  logical: Sequence[str | None], shape: Sequence[int], rules: AxisRules, mesh, name: str = "array"
) -> PartitionSpec:
  """PartitionSpec of one array from its logical axes.

  Mesh axes of size 1 are dropped (they shard nothing), and a mesh axis already used by an
  earlier dim of the same array is skipped.

  Raises:
    ValueError: a dim is not divisible by the mesh axes it maps to (names the array and dim).
  """
  used: set[str] = set()
  spec = []
  for dim, (axis, size) in enumerate(zip(logical, shape, strict=True)):
    mesh_axes = tuple(
      a for a in rules.mesh_axes(axis) if a not in used and mesh.shape.get(a, 1) > 1
    )
    shards = math.prod(mesh.shape[a] for a in mesh_axes)
    if size % shards:
      raise ValueError(
        f"{name}: dim {dim} ({axis}, size {size}) is not divisible by mesh axes "
        f"{'x'.join(mesh_axes)} = {shards}; change the mesh or the rules"
      )
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*spec)


def logical_axes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[tuple, tuple[str | None, ...]]]:
  """Flattened (collection, *path) -> (shape, logical axes) of every variable of Transformer(cfg).

  Nothing is allocated (`jax.eval_shape`). The router bias carries no annotation: it is small
  and replicated.
  """
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  boxed = {k: v for k, v in boxed.items() if k in ("params", "router_bias")}
  out = {}
  for key, leaf in traverse_util.flatten_dict(boxed).items():
    if isinstance(leaf, nn.LogicallyPartitioned):
      out[key] = (leaf.value.shape, tuple(leaf.names))
    else:
      out[key] = (leaf.shape, (None,) * len(leaf.shape))
  return out


def check_config(cfg: ModelConfig, mesh) -> None:
  """Config-level checks a mesh imposes, before any compile.

  Raises:
    ValueError: n_routed_experts not divisible by the expert axis (names both numbers).
  """
  e = mesh.shape.get("expert", 1)
  if cfg.n_routed_experts and cfg.n_routed_experts % e:
    raise ValueError(
      f"--mesh: expert={e} does not divide n_routed_experts={cfg.n_routed_experts}; "
      "choose an expert axis that divides it"
    )


def param_specs(cfg: ModelConfig, mesh, rules: AxisRules) -> dict[str, Any]:
  """{"params": ..., "router_bias": ...} trees of PartitionSpecs for Transformer(cfg)."""
  check_config(cfg, mesh)
  flat = {
    key: logical_to_spec(axes, shape, rules, mesh, name="/".join(key))
    for key, (shape, axes) in logical_axes(cfg).items()
  }
  return traverse_util.unflatten_dict(flat)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: AxisRules) -> dict[str, Any]:
  """`param_specs` as NamedShardings on `mesh`."""
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    param_specs(cfg, mesh, rules),
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def batch_sharding(mesh: Mesh, rules: AxisRules, ndim: int = 2) -> NamedSharding:
  """Sharding of a [batch, length, ...] input: batch over the rules' batch axes."""
  batch = tuple(a for a in rules.mesh_axes("batch") if mesh.shape.get(a, 1) > 1)
  lead = batch[0] if len(batch) == 1 else (batch or None)
  return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def cache_shardings(cache: Any, mesh: Mesh, rules: AxisRules) -> Any:
  """Shardings of the decode cache (either `ModelConfig.decode_cache` form): the cached arrays
  (absorbed latent and RoPE key [..., b, t, dim]; naive key and value [..., b, h, t, dim]) and
  the slot validity ([..., b, t]) split on the batch dim like the batch; the naive form's head
  dim split like the heads (over `tensor`); the write index (a scalar per layer) replicated.
  The absorbed cache has no head axis (MLA caches the shared latent), so `tensor` does not
  split it."""
  lead = batch_sharding(mesh, rules).spec[0]
  heads = tuple(a for a in rules.mesh_axes("heads") if mesh.shape.get(a, 1) > 1)
  heads = heads[0] if len(heads) == 1 else (heads or None)
  trailing = {"latent": 2, "rope_key": 2, "key": 3, "value": 3, "valid": 1}  # dims after b

  def pick(path, leaf):
    name = _dict_keys(path)[-1] if _dict_keys(path) else ""
    if name not in trailing:
      return NamedSharding(mesh, PartitionSpec())
    dims = [None] * leaf.ndim
    dims[leaf.ndim - 1 - trailing[name]] = lead
    if name in ("key", "value"):
      dims[leaf.ndim - 3] = heads  # [..., b, h, t, dim]
    return NamedSharding(mesh, PartitionSpec(*dims))

  return jax.tree_util.tree_map_with_path(pick, cache)


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def tree_shardings(tree: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that mirrors the params somewhere inside (optimizer state, grads).

  A leaf whose dict-key path ends with a param's path takes that param's sharding when the
  shapes agree (Adam's mu and nu); every other leaf (step counts, scalars) is replicated.
  """
  by_path = {_dict_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = _dict_keys(path)
    for start in range(len(keys)):
      s = by_path.get(keys[start:])
      if s is not None and len(s.spec) <= len(getattr(leaf, "shape", ())):
        return s
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)
