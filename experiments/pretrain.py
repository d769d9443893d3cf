r"""Pretrains a DeepSeek-V3-architecture model on the built-in synthetic addition task.

  python -m experiments.pretrain --preset=tiny --num_steps=300

Prints the loss every --log_every steps. Measured on a 2-core CPU: the tiny preset compiles in
about 30 s and runs 300 steps in about 45 s more, the total loss (LM + 0.3 MTP) falling from 7.2
to 2.3 (LM loss 5.5 -> 1.8).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
from absl import app, flags

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from experiments.flagfile import replayable_flags
from r1jax import ModelConfig, distributed, param_count, sharding
from r1jax.checkpoint import load_weights, read_config
from r1jax.train import trainer
from r1jax.train.loop import TrainConfig, check_fits, train

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Model preset: tiny | small | v2_lite | v3_671b.")
flags.DEFINE_string("moe_impl", "auto", "MoE dispatch implementation: auto | xla | reference.")
flags.DEFINE_integer("num_steps", 300, "Training steps.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.")
flags.DEFINE_integer("seed", 0, "Seed for params and data.")
flags.DEFINE_float("mtp_weight", 0.3, "Weight lambda of the multi-token-prediction loss.")
flags.DEFINE_float("bias_update_speed", 1e-3, "Aux-loss-free balancing speed gamma.")
flags.DEFINE_integer("log_every", 25, "Print the loss every this many steps.")
flags.DEFINE_string(
  "mesh",
  "",
  "Device mesh AXIS=SIZE,... over data, fsdp, expert, tensor (-1: the rest), e.g. "
  "data=2,expert=4; empty: one device.",
)
flags.DEFINE_string("rules", "ep_fsdp", "Sharding rules preset: fsdp | ep_fsdp | ep_as_dp.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: process 0's host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-process: processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_string(
  "workdir",
  None,
  "Run directory: flags.txt, config.json, run_info.json, metrics.jsonl, checkpoints/. An "
  "existing run there is resumed from its newest checkpoint.",
)
flags.DEFINE_integer("save_every", 100, "Checkpoint every this many steps (with --workdir).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept on disk (with --workdir).")
flags.DEFINE_string(
  "init_from",
  None,
  "Start from these weights: an r1jax weights directory (`python -m r1jax.hf convert` writes "
  "one from an HF checkpoint). Its config replaces --preset.",
)


def configs_from_flags() -> tuple[ModelConfig, TrainConfig]:
  """Builds and validates both configs; a ValueError names the field (= the flag)."""
  if FLAGS.init_from:
    try:
      stored = read_config(FLAGS.init_from)
    except ValueError as err:
      raise ValueError(f"init_from: {err}") from None
    model_cfg = dataclasses.replace(stored, moe_impl=FLAGS.moe_impl)
  else:
    model_cfg = ModelConfig.from_preset(FLAGS.preset, moe_impl=FLAGS.moe_impl)
  train_cfg = TrainConfig(
    num_steps=FLAGS.num_steps,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    learning_rate=FLAGS.learning_rate,
    seed=FLAGS.seed,
    log_every=FLAGS.log_every,
    mtp_weight=FLAGS.mtp_weight,
    bias_update_speed=FLAGS.bias_update_speed,
  )
  check_fits(model_cfg, train_cfg)
  return model_cfg, train_cfg


def _check_workdir(workdir: str) -> None:
  """A workdir is new, empty, or an r1jax run (resumed); anything else is left untouched."""
  if os.path.isdir(workdir) and os.listdir(workdir):
    if not os.path.exists(os.path.join(workdir, "flags.txt")):
      raise ValueError(
        f"--workdir: {workdir} is not empty and holds no r1jax run (no flags.txt); "
        "choose a new directory"
      )
  elif os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir: {workdir} is a file; choose a directory")


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  try:
    model_cfg, train_cfg = configs_from_flags()
    run_cfg = None
    if FLAGS.workdir:
      run_cfg = trainer.RunConfig(FLAGS.workdir, FLAGS.save_every, FLAGS.keep_checkpoints)
      _check_workdir(FLAGS.workdir)
    mesh_sizes = sharding.parse_mesh(FLAGS.mesh)
    if FLAGS.rules not in sharding.RULES:
      raise ValueError(f"--rules: unknown {FLAGS.rules!r}; choose one of {sorted(sharding.RULES)}")
    rules = sharding.RULES[FLAGS.rules]
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    mesh = None
    if FLAGS.mesh:
      mesh = sharding.make_mesh(**mesh_sizes)
      sharding.param_specs(model_cfg, mesh, rules)  # divisibility, before any compile
      batch_shards = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
      if train_cfg.batch_size % batch_shards:
        raise ValueError(
          f"--batch_size: {train_cfg.batch_size} does not split over the {batch_shards} batch "
          "shards of --mesh (data x fsdp x expert)"
        )
  except ValueError as err:
    exit_on_bad_input(str(err))
  source = f"weights {FLAGS.init_from}" if FLAGS.init_from else f"preset {FLAGS.preset}"
  print(
    f"r1jax pretrain: {source}, {param_count(model_cfg):,} params, "
    f"{jax.device_count()} {jax.default_backend()} device(s) in {jax.process_count()} "
    f"process(es), mesh {dict(mesh.shape) if mesh is not None else 'none'}"
  )
  print(f"train config: {dataclasses.asdict(train_cfg)}")
  init_variables = load_weights(FLAGS.init_from)[1] if FLAGS.init_from else None
  if not FLAGS.workdir:
    history = train(model_cfg, train_cfg, init_variables=init_variables, mesh=mesh, rules=rules)
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"loss {first:.4f} -> {last:.4f} over {train_cfg.num_steps} steps")
    sys.stdout.flush()
    return
  if not os.path.exists(os.path.join(FLAGS.workdir, "flags.txt")):
    command = "python -m experiments.pretrain --flagfile=<this file> [--workdir=NEW_DIR]"
    flags_text = replayable_flags(__name__, header=command)
    trainer.write_run_record(FLAGS.workdir, flags_text, model_cfg, train_cfg, mesh)
  try:
    result = trainer.run(
      model_cfg, train_cfg, run_cfg, mesh=mesh, rules=rules, init_variables=init_variables
    )
  except trainer.NonFiniteLoss as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(3)
  history = result["history"]
  if history:
    print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} ({result['status']})")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
