r"""Sizes a training run before it is paid for: per-device memory and token-exchange traffic.

  python -m experiments.plan --preset=v3_671b --mesh=data=1,fsdp=32,expert=8,tensor=1 \
      --batch=256 --seq=4096 --accelerator=v5p

Nothing is allocated and no devices are needed: the params' shardings come from the rules table
on an abstract mesh (`jax.eval_shape`). `r1jax/memory_plan.py` documents every term. The params
table reads as "count x 4 bytes / shards = per device", so it can be checked by hand.
"""

from __future__ import annotations

import math
import sys

from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from r1jax import ModelConfig, memory_plan, param_count, sharding

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "v3_671b", "Model preset: tiny | small | v2_lite | v3_671b.")
flags.DEFINE_string("mesh", "data=1,fsdp=32,expert=8,tensor=1", "Mesh AXIS=SIZE,... (as pretrain).")
flags.DEFINE_integer("chips", None, "Devices in all; needed only when an axis of --mesh is -1.")
flags.DEFINE_integer("batch", 256, "Global batch, in sequences.")
flags.DEFINE_integer("seq", 4096, "Tokens per sequence.")
flags.DEFINE_string("rules", "ep_fsdp", "Sharding rules preset: fsdp | ep_fsdp | ep_as_dp.")
flags.DEFINE_string("remat", "full", "Remat policy for the activation estimate: full | none.")
flags.DEFINE_string("accelerator", None, "Say whether it fits: v5p | v6e | h100 | h200.")

GB = 1e9


def _mesh_sizes() -> dict[str, int]:
  sizes = sharding.parse_mesh(FLAGS.mesh)
  if -1 in sizes.values():
    if not FLAGS.chips:
      raise ValueError("--chips: needed to resolve the -1 axis of --mesh")
    return sharding.resolve_mesh_shape(sizes, FLAGS.chips)
  if FLAGS.chips and math.prod(sizes.values()) != FLAGS.chips:
    raise ValueError(
      f"--mesh: {FLAGS.mesh} has {math.prod(sizes.values())} devices, not {FLAGS.chips}"
    )
  return sizes


def render(cfg: ModelConfig, p: memory_plan.Plan) -> str:
  lines = [
    f"mesh {p.mesh} ({math.prod(p.mesh.values())} devices), local batch {p.local_batch} x "
    f"{FLAGS.seq} tokens, rules {FLAGS.rules}, remat {FLAGS.remat}",
    "",
    f"{'params (float32)':<28}{'count':>16}{'bytes':>7}{'shards':>8}{'per device':>14}",
  ]
  for g in p.param_groups:
    lines.append(
      f"{'  split ' + str(g.shards) + ' ways':<28}{g.count:>16,}{4:>7}{g.shards:>8}"
      f"{g.bytes_per_device(4) / GB:>11.2f} GB"
    )
  total_params = sum(g.count for g in p.param_groups)
  lines += [
    f"{'  all params':<28}{total_params:>16,}{'':>15}{p.params / GB:>11.2f} GB",
    "",
    f"{'per device':<28}{'GB':>14}",
  ]
  for name, value in (
    ("params", p.params),
    ("gradients (float32)", p.gradients),
    ("optimizer (Adam mu, nu)", p.optimizer),
    ("activations (estimate)", p.activations),
    ("total", p.total),
  ):
    lines.append(f"{name:<28}{value / GB:>14.2f}")
  lines.append(f"{'all-to-all per step':<28}{p.all_to_all / GB:>14.2f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    cfg = ModelConfig.from_preset(FLAGS.preset)
    p = memory_plan.plan(
      cfg, _mesh_sizes(), batch=FLAGS.batch, seq=FLAGS.seq, rules=FLAGS.rules, remat=FLAGS.remat
    )
    fit = memory_plan.fit_report(p, FLAGS.accelerator) if FLAGS.accelerator else None
  except ValueError as err:
    exit_on_bad_input(str(err))
  main_b = param_count(cfg) / 1e9
  mtp_b = param_count(cfg, include_mtp=True) / 1e9 - main_b
  print(f"plan: {FLAGS.preset}, {main_b:.2f}B params + {mtp_b:.2f}B MTP (trained with it)")
  print(render(cfg, p))
  if fit:
    print(fit)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
