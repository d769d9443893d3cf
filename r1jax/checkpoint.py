"""Weights-only checkpoints: what `--init_from` reads and `python -m r1jax.hf convert` writes.

Layout of a weights directory:
  DIR/config.json   the ModelConfig fields (r1jax names, not HF's)
  DIR/weights/      an orbax StandardCheckpointer tree {"params": ..., "router_bias": ...}

`read_config` and `load_weights` also take a training run's workdir (`r1jax.train.trainer`):
its config.json's "model" part, and the params and router bias of its newest checkpoint (the
optimizer state is not used).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.linen import meta

from r1jax.config import ModelConfig
from r1jax.model import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_DIR = "weights"
_COLLECTIONS = ("params", "router_bias")


def run_checkpoint(path: str) -> str | None:
  """The newest `checkpoints/<step>/state` of a training run's workdir; None if `path` is not
  a run with a checkpoint."""
  directory = os.path.join(path, "checkpoints")
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)) or not os.path.isdir(directory):
    return None
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  for step in reversed(steps):
    state = os.path.join(os.path.abspath(directory), str(step), "state")
    if os.path.isdir(state):
      return state
  return None


def is_weights_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, WEIGHTS_DIR)) and os.path.isfile(
    os.path.join(path, CONFIG_FILE)
  )


def save_weights(path: str, cfg: ModelConfig, variables: dict[str, Any]) -> str:
  """Writes config.json and the params/router_bias collections; refuses to overwrite."""
  path = os.path.abspath(path)
  target = os.path.join(path, WEIGHTS_DIR)
  if os.path.exists(target):
    raise ValueError(f"{target}: already exists; choose a new destination (nothing overwritten)")
  tree = {k: v for k, v in meta.unbox(dict(variables)).items() if k in _COLLECTIONS}
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, tree)
  checkpointer.wait_until_finished()
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  return path


def read_config(path: str) -> ModelConfig:
  """The ModelConfig of a weights directory; one-line errors for a missing or foreign file."""
  file = os.path.join(path, CONFIG_FILE)
  run = run_checkpoint(path)
  if not is_weights_dir(path) and run is None:
    raise ValueError(
      f"{path}: not an r1jax weights directory (needs {CONFIG_FILE} and {WEIGHTS_DIR}/) nor a "
      "training run with a checkpoint; convert an HF checkpoint with "
      "`python -m r1jax.hf convert SRC DST`"
    )
  with open(file) as f:
    fields = json.load(f)
  if run is not None and not is_weights_dir(path):
    fields = fields.get("model") or {}
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{file}: unknown field {unknown[0]!r}; was it written by a newer r1jax?")
  return ModelConfig(**fields)


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened (collection, *path) -> abstract leaf of Transformer(cfg).init, nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  tree = {k: v for k, v in meta.unbox(dict(abstract)).items() if k in _COLLECTIONS}
  return traverse_util.flatten_dict(tree)


def load_weights(path: str) -> tuple[ModelConfig, dict[str, Any]]:
  """Restores (cfg, variables); every leaf is checked against the config's shapes first."""
  cfg = read_config(path)
  expected = expected_shapes(cfg)
  target = os.path.join(os.path.abspath(path), WEIGHTS_DIR)
  if not is_weights_dir(path):
    target = run_checkpoint(path)
  checkpointer = ocp.StandardCheckpointer()
  stored = traverse_util.flatten_dict(checkpointer.metadata(target).item_metadata.tree)
  for key, leaf in expected.items():
    name = "/".join(key)
    if key not in stored:
      raise ValueError(
        f"{path}: tensor {name} is missing; the checkpoint does not match its config"
      )
    if tuple(stored[key].shape) != tuple(leaf.shape):
      raise ValueError(
        f"{path}: tensor {name} has shape {list(stored[key].shape)}, the config needs "
        f"{list(leaf.shape)}"
      )
  restored = checkpointer.restore(target)
  return cfg, {k: dict(restored[k]) for k in _COLLECTIONS if k in restored}
