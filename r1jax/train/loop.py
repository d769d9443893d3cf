"""A compact training loop on the built-in synthetic task (the quickstart's library call).

The full trainer (checkpoints, run records, data pipelines, metrics files) builds on this.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import sharding
from r1jax.config import ModelConfig
from r1jax.data.synthetic import addition_batch
from r1jax.model import Transformer
from r1jax.train.optim import check_optimizer_fields, make_optimizer, make_schedule
from r1jax.train.step import LossConfig, make_init, make_train_step

__all__ = ["TrainConfig", "check_fits", "make_optimizer", "make_schedule", "train"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps, batch and optimiser of a run. Validated on construction."""

  num_steps: int = 300
  batch_size: int = 16
  seq_len: int = 64
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  lr_schedule: str = "cosine"  # cosine | wsd | constant (r1jax.train.optim)
  decay_fraction: float = 0.1  # wsd: the final fraction of the steps that decays
  end_lr_fraction: float = 0.1  # the final learning rate, as a fraction of the peak
  adam_b1: float = 0.9
  adam_b2: float = 0.95  # DeepSeek-V3's
  weight_decay: float = 0.1
  weight_decay_mask: str = "no_norms"  # no_norms | no_norms_embeddings | all
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 25
  mtp_weight: float = 0.3
  bias_update_speed: float = 1e-3
  loss_chunk: int = 0  # sequence positions per cross-entropy chunk; 0: the whole logits
  router_z_loss: float = 0.0  # ST-MoE router z-loss weight; 0: off

  def __post_init__(self):
    for name in ("num_steps", "batch_size", "log_every"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
    if self.seq_len < 3:
      raise ValueError(f"seq_len: must be >= 3 (next-token and MTP targets), got {self.seq_len}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate: must be positive, got {self.learning_rate}")
    for name in ("warmup_steps", "mtp_weight", "bias_update_speed", "loss_chunk", "router_z_loss"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
    check_optimizer_fields(self)

  def loss_config(self) -> LossConfig:
    return LossConfig(self.mtp_weight, self.bias_update_speed, self.loss_chunk, self.router_z_loss)


def check_fits(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
  """Config combinations that only make sense together; raised before anything compiles."""
  if train_cfg.seq_len > model_cfg.max_position_embeddings:
    raise ValueError(
      f"seq_len: {train_cfg.seq_len} exceeds max_position_embeddings="
      f"{model_cfg.max_position_embeddings}; shorten it"
    )


def train(
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  log: Callable[[str], None] = print,
  init_variables: dict[str, Any] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: sharding.AxisRules | None = None,
) -> list[dict[str, float]]:
  """Trains on the synthetic addition task; returns the logged metrics (one dict per log step).

  `init_variables` ({"params", "router_bias"}, e.g. from `r1jax.checkpoint.load_weights`) replace
  the random init; the optimizer state starts fresh. With a `mesh` (one process or many), the
  state lives in the `rules`' shardings and every process builds the same global batch, of
  which each device takes its shard.
  """
  check_fits(model_cfg, train_cfg)
  if model_cfg.vocab_size < 128:
    raise ValueError(
      f"vocab_size: the synthetic task uses ASCII bytes, needs >= 128, got {model_cfg.vocab_size}"
    )
  model = Transformer(model_cfg)
  optimizer = make_optimizer(train_cfg)
  rules = rules or sharding.RULES["ep_fsdp"]
  shape = (train_cfg.batch_size, train_cfg.seq_len)
  in_batch = sharding.batch_sharding(mesh, rules) if mesh is not None else None

  def global_array(host):
    if mesh is None:
      return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, in_batch, lambda index: host[index])

  batch = lambda step: global_array(addition_batch(train_cfg.seed, step, *shape))  # noqa: E731
  state = make_init(model, optimizer, mesh, rules)(jax.random.key(train_cfg.seed), batch(0))
  if init_variables is not None:
    state = state.replace(
      params=init_variables["params"], router_bias=init_variables.get("router_bias", {})
    )
  step_fn = make_train_step(model, optimizer, train_cfg.loss_config(), mesh, rules)
  mask = global_array(np.ones(shape, np.int32))
  history, start = [], time.perf_counter()
  for step in range(train_cfg.num_steps):
    state, metrics = step_fn(state, batch(step), mask)
    last = step + 1 == train_cfg.num_steps
    if step % train_cfg.log_every == 0 or last:
      row = {"step": step, **{k: float(v) for k, v in metrics.items() if not np.ndim(v)}}
      row["elapsed_s"] = time.perf_counter() - start
      history.append(row)
      log(
        f"step {step:5d}/{train_cfg.num_steps}  loss {row['loss']:.4f}  lm {row['lm_loss']:.4f}"
        f"  mtp {row['mtp_loss']:.4f}  grad_norm {row['grad_norm']:.3f}  {row['elapsed_s']:.1f}s"
      )
  return history
