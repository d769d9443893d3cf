r"""The flags and main of the training experiments (`experiments.pretrain`, `experiments.sft`).

Everything is validated, and the data read and tokenised, before the run record is written and
before anything compiles: bad input exits 2 with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing

import jax
from absl import flags, logging

from experiments.flag_errors import exit_on_bad_input
from experiments.flagfile import replayable_flags
from r1jax import ModelConfig, distributed, host_memory, param_count, sharding
from r1jax.checkpoint import load_weights, read_config
from r1jax.config import variant_overrides
from r1jax.data.pipeline import SOURCES, DataConfig, make_pipeline
from r1jax.train import paths, trainer
from r1jax.train.loop import TrainConfig, check_fits
from r1jax.train.optim import SCHEDULES, WEIGHT_DECAY_MASKS

FLAGS = flags.FLAGS
# --- model
flags.DEFINE_string("preset", "tiny", "Model preset: tiny | small | v2_lite | v3_671b.")
flags.DEFINE_string("moe_impl", "auto", "MoE dispatch implementation: auto | xla | reference.")
flags.DEFINE_string("dtype", "", "Compute dtype (bfloat16 | float32); empty: the preset's.")
flags.DEFINE_string("remat", "", "Layer remat policy: none | full | dots; empty: the preset's.")
flags.DEFINE_float("balance_alpha", None, "Sequence-wise balance loss alpha; unset: the preset's.")
flags.DEFINE_list(
  "model_overrides", [], "More ModelConfig fields, KEY=VALUE,..., e.g. num_hidden_layers=2."
)
# --- optional attention and token-efficiency variants (off in DeepSeek's models; layers unrolled)
flags.DEFINE_list(
  "attention_windows",
  [],
  "Per-layer attention window, one per layer: 0 global, W local over the W most recent tokens, "
  "e.g. 0,128,0,128; empty: all global.",
)
flags.DEFINE_float("merge_ratio", 0.0, "Token merging: fraction of tokens merged away; 0: off.")
flags.DEFINE_integer("merge_layer", 1, "Token merging: the first layer on the merged tokens.")
flags.DEFINE_integer("inflate_layer", 2, "Token merging: the first layer on every token again.")
flags.DEFINE_float("merge_threshold", 0.9, "Token merging: cosine similarity merged first.")
flags.DEFINE_string(
  "init_from",
  None,
  "Start from these weights (the optimizer starts fresh): an r1jax weights directory "
  "(`python -m r1jax.hf convert` writes one from an HF checkpoint) or an earlier run's workdir "
  "(its newest checkpoint). Its model config replaces --preset.",
)
# --- steps, batch, optimizer, losses
flags.DEFINE_integer("num_steps", 300, "Training steps.")
flags.DEFINE_integer("batch_size", 16, "Sequences per step (all processes together).")
flags.DEFINE_integer("seq_len", 64, "Tokens per sequence.")
flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate.")
flags.DEFINE_integer("warmup_steps", 20, "Linear warmup steps.")
flags.DEFINE_enum("lr_schedule", "cosine", list(SCHEDULES), "Decay after the warmup.")
flags.DEFINE_float("decay_fraction", 0.1, "wsd: the final fraction of the steps that decays.")
flags.DEFINE_float("end_lr_fraction", 0.1, "Final learning rate as a fraction of the peak.")
flags.DEFINE_float("adam_b1", 0.9, "AdamW beta1.")
flags.DEFINE_float("adam_b2", 0.95, "AdamW beta2.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW decoupled weight decay.")
flags.DEFINE_enum(
  "weight_decay_mask", "no_norms", list(WEIGHT_DECAY_MASKS), "Which params are decayed."
)
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clipping.")
flags.DEFINE_integer("seed", 0, "Seed for params and data.")
flags.DEFINE_float("mtp_weight", 0.3, "Weight lambda of the multi-token-prediction loss.")
flags.DEFINE_float("bias_update_speed", 1e-3, "Aux-loss-free balancing speed gamma.")
flags.DEFINE_integer(
  "loss_chunk", 0, "Sequence positions per cross-entropy chunk (0: whole logits at once)."
)
flags.DEFINE_float("router_z_loss", 0.0, "Router z-loss weight (ST-MoE); 0: off.")
flags.DEFINE_integer("log_every", 25, "Log metrics every this many steps.")
# --- data
flags.DEFINE_enum("data_source", "synthetic", list(SOURCES), "Where the documents come from.")
flags.DEFINE_list("data_files", [], "text / jsonl / sft sources: files or globs.")
flags.DEFINE_string("jsonl_field", "text", "jsonl: the string field holding a document.")
flags.DEFINE_enum("text_unit", "file", ["file", "paragraph", "line"], "text: what a document is.")
flags.DEFINE_string("prompt_field", "prompt", "sft: the prompt field (not trained on).")
flags.DEFINE_string("response_field", "response", "sft: the response field (trained on).")
flags.DEFINE_string("tokenizer", "bytes", "bytes, or a tokenizer.json (or a directory with one).")
flags.DEFINE_bool("packing", True, "Pack documents back to back (else one per row).")
flags.DEFINE_bool("shuffle", True, "Shuffle the file documents (each epoch).")
flags.DEFINE_integer("num_epochs", None, "Passes over the files; unset: repeat forever.")
flags.DEFINE_integer("synthetic_digits", 3, "synthetic: digits per operand.")
# --- mesh and processes
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
# --- run directory
flags.DEFINE_string(
  "workdir",
  None,
  "Run directory: flags.txt, config.json, run_info.json, metrics.jsonl, checkpoints/. An "
  "existing run there is resumed from its newest checkpoint. Unset: nothing is kept.",
)
flags.DEFINE_integer("save_every", 100, "Checkpoint every this many steps.")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept on disk.")


def _typed(field: dataclasses.Field, text: str):
  """A --model_overrides value as the ModelConfig field's type (bool, int, float, str, or one of
  them or None)."""
  kind = typing.get_type_hints(ModelConfig)[field.name]
  options = typing.get_args(kind) or (kind,)
  if text == "None" and type(None) in options:
    return None
  base = next(t for t in options if t is not type(None))
  if base is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--model_overrides: {field.name}={text!r} is not a bool")
    return text.lower() in ("true", "1")
  try:
    return base(text)
  except ValueError:
    raise ValueError(f"--model_overrides: {field.name}={text!r} is not {base.__name__}") from None


def model_overrides() -> dict:
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  out = {}
  for item in FLAGS.model_overrides:
    key, sep, value = item.partition("=")
    if not sep or key not in fields:
      raise ValueError(
        f"--model_overrides: {item!r} is not FIELD=VALUE with a ModelConfig field "
        f"(e.g. num_hidden_layers=2)"
      )
    out[key] = _typed(fields[key], value)
  for flag, key in (("dtype", "dtype"), ("remat", "remat")):
    if getattr(FLAGS, flag):
      out[key] = getattr(FLAGS, flag)
  if FLAGS.balance_alpha is not None:
    out["aux_loss_alpha"] = FLAGS.balance_alpha
  out.update(
    variant_overrides(
      FLAGS.attention_windows,
      FLAGS.merge_ratio,
      FLAGS.merge_layer,
      FLAGS.inflate_layer,
      FLAGS.merge_threshold,
    )
  )
  out["moe_impl"] = FLAGS.moe_impl
  return out


def configs_from_flags() -> tuple[ModelConfig, TrainConfig, DataConfig]:
  """Builds and validates the configs; a ValueError names the field (= the flag)."""
  overrides = model_overrides()
  if FLAGS.init_from:
    try:
      stored = read_config(FLAGS.init_from)
    except ValueError as err:
      raise ValueError(f"init_from: {err}") from None
    model_cfg = dataclasses.replace(stored, **overrides)
  else:
    model_cfg = ModelConfig.from_preset(FLAGS.preset, **overrides)
  train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
  train_cfg = TrainConfig(**{name: getattr(FLAGS, name) for name in train_fields})
  check_fits(model_cfg, train_cfg)
  data_cfg = DataConfig(
    source=FLAGS.data_source,
    data_files=tuple(FLAGS.data_files),
    jsonl_field=FLAGS.jsonl_field,
    text_unit=FLAGS.text_unit,
    prompt_field=FLAGS.prompt_field,
    response_field=FLAGS.response_field,
    tokenizer=FLAGS.tokenizer,
    synthetic_digits=FLAGS.synthetic_digits,
    seq_len=FLAGS.seq_len,
    batch_size=FLAGS.batch_size,
    packing=FLAGS.packing,
    seed=FLAGS.seed,
    shuffle=FLAGS.shuffle,
    num_epochs=FLAGS.num_epochs,
  )
  return model_cfg, train_cfg, data_cfg


def _mesh_from_flags(model_cfg: ModelConfig, train_cfg: TrainConfig, rules):
  if not FLAGS.mesh:
    return None
  mesh = sharding.make_mesh(**sharding.parse_mesh(FLAGS.mesh))
  sharding.param_specs(model_cfg, mesh, rules)  # divisibility, before any compile
  batch_shards = math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))
  if train_cfg.batch_size % batch_shards:
    raise ValueError(
      f"--batch_size: {train_cfg.batch_size} does not split over the {batch_shards} batch "
      "shards of --mesh (data x fsdp x expert)"
    )
  return mesh


def main(argv, job: str) -> None:
  """The experiment `job` ("pretrain" or "sft"): validate everything, record, train."""
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  if not FLAGS["verbosity"].present:  # orbax logs every save step at INFO
    logging.set_verbosity(logging.WARNING)
  host_memory.retain_freed_memory_on_cpu()  # before XLA's threads start: see r1jax/host_memory.py
  try:
    if job == "sft" and FLAGS.data_source != "sft":
      raise ValueError(
        f"--data_source: sft trains on prompt/response pairs; use --data_source=sft (got "
        f"{FLAGS.data_source!r}), or experiments.pretrain for plain text"
      )
    model_cfg, train_cfg, data_cfg = configs_from_flags()
    if FLAGS.workdir:
      trainer.check_workdir(FLAGS.workdir)
      trainer.check_resume(FLAGS.workdir, model_cfg, train_cfg, data_cfg)
    run_cfg = trainer.RunConfig(FLAGS.workdir, FLAGS.save_every, FLAGS.keep_checkpoints)
    sharding.parse_mesh(FLAGS.mesh)
    if FLAGS.rules not in sharding.RULES:
      raise ValueError(f"--rules: unknown {FLAGS.rules!r}; choose one of {sorted(sharding.RULES)}")
    rules = sharding.RULES[FLAGS.rules]
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    mesh = _mesh_from_flags(model_cfg, train_cfg, rules)
    # Reads and tokenises the data now: a bad file or token id fails before anything is written.
    data = make_pipeline(
      data_cfg,
      vocab_size=model_cfg.vocab_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  except ValueError as err:
    exit_on_bad_input(str(err))
  source = f"weights {FLAGS.init_from}" if FLAGS.init_from else f"preset {FLAGS.preset}"
  print(
    f"r1jax {job}: {source}, {param_count(model_cfg):,} params, "
    f"{jax.device_count()} {jax.default_backend()} device(s) in {jax.process_count()} "
    f"process(es), mesh {dict(mesh.shape) if mesh is not None else 'none'}, "
    f"data {data_cfg.source}"
  )
  init_variables = load_weights(FLAGS.init_from)[1] if FLAGS.init_from else None
  workdir = FLAGS.workdir
  if not workdir:
    print("no --workdir: no run record, metrics files or checkpoints are kept")
  elif not paths.exists(paths.join(workdir, "flags.txt")):
    command = f"python -m experiments.{job} --flagfile=<this file> [--workdir=NEW_DIR]"
    flags_text = replayable_flags(("experiments.train_main",), header=command)
    trainer.write_run_record(workdir, flags_text, model_cfg, train_cfg, mesh, data_cfg)
  try:
    result = trainer.run(
      model_cfg,
      train_cfg,
      run_cfg,
      data=data,
      mesh=mesh,
      rules=rules,
      init_variables=init_variables,
    )
  except trainer.NonFiniteLoss as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(3)
  history = result["history"]
  if history:
    print(f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f} ({result['status']})")
  sys.stdout.flush()
