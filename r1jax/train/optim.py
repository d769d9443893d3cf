"""The optimizer of the trainer: AdamW after global-norm clipping, on a warmup + decay schedule.

Schedules (peak lr = `learning_rate`, end lr = `end_lr_fraction` x peak):
  cosine    linear warmup over `warmup_steps`, then cosine decay to the end lr at `num_steps`.
  wsd       warmup-stable-decay: linear warmup, the peak held, then a linear decay to the end lr
            over the last `decay_fraction` of the steps (DeepSeek-V3 and MiniCPM's shape: the
            stable phase can be extended, or branched, without retraining the decay).
  constant  linear warmup, then the peak.

Weight decay masks (AdamW's decoupled decay, `weight_decay` x lr):
  no_norms              every parameter but the RMSNorm scales (leaves named "scale").
  no_norms_embeddings   also not the input embedding and the output head.
  all                   every parameter.
"""

from __future__ import annotations

import optax
from flax import traverse_util

SCHEDULES = ("cosine", "wsd", "constant")
WEIGHT_DECAY_MASKS = ("no_norms", "no_norms_embeddings", "all")
_EMBEDDINGS = ("embed", "lm_head")


def check_optimizer_fields(cfg) -> None:
  """One-line ValueErrors naming the field (= the flag) of a TrainConfig's optimizer part."""
  if cfg.lr_schedule not in SCHEDULES:
    raise ValueError(f"lr_schedule: unknown {cfg.lr_schedule!r}; choose one of {SCHEDULES}")
  if cfg.weight_decay_mask not in WEIGHT_DECAY_MASKS:
    raise ValueError(
      f"weight_decay_mask: unknown {cfg.weight_decay_mask!r}; choose one of {WEIGHT_DECAY_MASKS}"
    )
  if not 0.0 < cfg.decay_fraction <= 1.0:
    raise ValueError(f"decay_fraction: must be in (0, 1], got {cfg.decay_fraction}")
  if not 0.0 <= cfg.end_lr_fraction <= 1.0:
    raise ValueError(f"end_lr_fraction: must be in [0, 1], got {cfg.end_lr_fraction}")
  for name in ("adam_b1", "adam_b2"):
    if not 0.0 <= getattr(cfg, name) < 1.0:
      raise ValueError(f"{name}: must be in [0, 1), got {getattr(cfg, name)}")
  if cfg.weight_decay < 0 or not cfg.clip_norm > 0:
    raise ValueError("weight_decay, clip_norm: weight_decay must be >= 0 and clip_norm > 0")


def make_schedule(cfg) -> optax.Schedule:
  """The learning rate by step; see the module docstring."""
  peak, end = cfg.learning_rate, cfg.end_lr_fraction * cfg.learning_rate
  warmup = min(cfg.warmup_steps, cfg.num_steps)
  if cfg.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(cfg.num_steps, warmup + 1), end_value=end
    )
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.lr_schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  decay = max(1, round(cfg.decay_fraction * cfg.num_steps))
  stable = max(cfg.num_steps - decay - warmup, 0)
  return optax.join_schedules(
    [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
    [warmup, warmup + stable],
  )


def weight_decay_mask(kind: str):
  """A params -> bool tree callable for optax.adamw's `mask` (True: decayed)."""

  def mask(params):
    flat = traverse_util.flatten_dict(params)
    keep = {}
    for path in flat:
      decayed = kind == "all" or path[-1] != "scale"
      if kind == "no_norms_embeddings" and path[-1] in _EMBEDDINGS and len(path) == 1:
        decayed = False
      keep[path] = decayed
    return traverse_util.unflatten_dict(keep)

  return mask


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm), then AdamW(b1, b2, weight decay under the mask)."""
  return optax.chain(
    optax.clip_by_global_norm(cfg.clip_norm),
    optax.adamw(
      make_schedule(cfg),
      b1=cfg.adam_b1,
      b2=cfg.adam_b2,
      weight_decay=cfg.weight_decay,
      mask=weight_decay_mask(cfg.weight_decay_mask),
    ),
  )
