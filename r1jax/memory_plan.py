"""Per-device memory and all-to-all traffic of a training run, computed without devices.

The params' PartitionSpecs come from `r1jax.sharding` on an abstract mesh (`jax.eval_shape`,
nothing allocated), so a 671B run on a 256-chip pod can be sized on a laptop.

Terms per device (mixed precision as the trainer runs it: float32 params and Adam moments,
bfloat16 compute):
  params      sum over leaves of size * 4 B / shards(leaf)
  gradients   the same as params (float32, sharded like the params)
  optimizer   Adam mu and nu: 2x params
  activations an estimate, per the remat policy, for the local batch b_l = batch / batch shards:
                full: every layer's input saved (L * b_l * s * m * 2 B) + one layer's working set
                none: every layer's working set
              working set of a layer = attention scores b_l * h_t * s^2 * 4 B (naive MLA, h_t =
              heads / tensor) + projections b_l * s * h_t * (2 (d + r) + d_v) * 2 B + MoE rows
              b_l * s * K * (m + 3 F / tensor) * 2 B; plus the logits b_l * s * V / tensor * 4 B.
All-to-all bytes per device and step (token exchange of the routed experts): each MoE layer
sends and receives the K copies of every local token, dispatch and combine, forward and twice
in the backward: num_moe_layers * 2 * 3 * b_l * s * K * m * 2 B * (n - 1) / n for the expert
axis size n (ragged_all_to_all; the all_gather fallback moves n / K times as much).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from r1jax import sharding
from r1jax.config import ModelConfig

ACCELERATORS_GB = {"v5p": 95.0, "v6e": 32.0, "h100": 80.0, "h200": 141.0}
REMAT_POLICIES = ("full", "none")
GB = 1e9


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Leaves that split over the same number of shards."""

  shards: int
  count: int  # parameters in the group (global)

  def bytes_per_device(self, bytes_per_param: int) -> float:
    return self.count * bytes_per_param / self.shards


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `plan` computed; all byte figures are per device."""

  mesh: dict[str, int]
  param_groups: tuple[ParamGroup, ...]
  params: float
  gradients: float
  optimizer: float
  activations: float
  all_to_all: float
  local_batch: int

  @property
  def total(self) -> float:
    return self.params + self.gradients + self.optimizer + self.activations


def _param_groups(cfg: ModelConfig, mesh, rules) -> tuple[ParamGroup, ...]:
  specs = sharding.param_specs(cfg, mesh, rules)
  shapes = sharding.logical_axes(cfg)
  groups: dict[int, int] = defaultdict(int)
  flat = {}
  for collection, tree in specs.items():
    stack = [((collection,), tree)]
    while stack:
      path, node = stack.pop()
      if isinstance(node, dict):
        stack += [(path + (k,), v) for k, v in node.items()]
      else:
        flat[path] = node
  for key, spec in flat.items():
    shape, _ = shapes[key]
    axes = [a for part in spec if part for a in (part if isinstance(part, tuple) else (part,))]
    groups[math.prod(mesh.shape[a] for a in axes)] += math.prod(shape)
  return tuple(ParamGroup(s, c) for s, c in sorted(groups.items()))


def _activations(cfg: ModelConfig, b: int, s: int, tensor: int, remat: str) -> float:
  h = cfg.num_attention_heads / tensor
  scores = b * h * s * s * 4
  proj = b * s * h * (2 * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + cfg.v_head_dim) * 2
  k = cfg.num_experts_per_tok
  moe = b * s * k * (cfg.hidden_size + 3 * cfg.moe_intermediate_size / tensor) * 2
  layer = scores + proj + moe
  logits = b * s * cfg.vocab_size / tensor * 4
  layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  if remat == "full":
    return layers * b * s * cfg.hidden_size * 2 + layer + logits
  return layers * layer + logits


def plan(
  cfg: ModelConfig,
  mesh_sizes: dict[str, int],
  *,
  batch: int,
  seq: int,
  rules: str = "ep_fsdp",
  remat: str = "full",
) -> Plan:
  """Sizes a training step of `cfg` on a mesh of `mesh_sizes` (every axis >= 1).

  Raises:
    ValueError: one line naming the flag: an expert axis that does not divide the experts, a
      batch that does not split over the batch axes, an unknown rules preset or remat policy.
  """
  if rules not in sharding.RULES:
    raise ValueError(f"--rules: unknown {rules!r}; choose one of {sorted(sharding.RULES)}")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"--remat: unknown {remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
  mesh = sharding.abstract_mesh(mesh_sizes)
  axis_rules = sharding.RULES[rules]
  groups = _param_groups(cfg, mesh, axis_rules)
  batch_shards = math.prod(mesh.shape[a] for a in axis_rules.mesh_axes("batch"))
  if batch % batch_shards:
    raise ValueError(
      f"--batch: {batch} sequences do not split over the {batch_shards} batch shards "
      f"(data x fsdp x expert); use a multiple of {batch_shards}"
    )
  b = batch // batch_shards
  params = sum(g.bytes_per_device(4) for g in groups)
  n = mesh.shape["expert"]
  moe_layers = cfg.num_moe_layers + cfg.num_nextn_predict_layers
  k, m = cfg.num_experts_per_tok, cfg.hidden_size
  a2a = moe_layers * 2 * 3 * b * seq * k * m * 2 * (n - 1) / n
  return Plan(
    mesh=dict(mesh.shape),
    param_groups=groups,
    params=params,
    gradients=params,
    optimizer=2 * params,
    activations=_activations(cfg, b, seq, mesh.shape["tensor"], remat),
    all_to_all=a2a,
    local_batch=b,
  )


def fit_report(p: Plan, accelerator: str) -> str:
  """One line: fits, or which term is the largest and by how much the total is over."""
  if accelerator not in ACCELERATORS_GB:
    raise ValueError(
      f"--accelerator: unknown {accelerator!r}; choose one of {', '.join(ACCELERATORS_GB)}"
    )
  hbm = ACCELERATORS_GB[accelerator] * GB
  if p.total <= hbm:
    return f"fits {accelerator} ({hbm / GB:.0f} GB): {p.total / GB:.1f} GB per device"
  terms = {
    "params": p.params,
    "gradients": p.gradients,
    "optimizer state": p.optimizer,
    "activations": p.activations,
  }
  worst = max(terms, key=terms.get)
  return (
    f"does not fit {accelerator} ({hbm / GB:.0f} GB): {p.total / GB:.1f} GB per device, "
    f"{(p.total - hbm) / GB:.1f} GB over; the largest term is {worst} ({terms[worst] / GB:.1f} GB)"
  )
