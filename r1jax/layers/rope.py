"""Rotary position embedding on the decoupled RoPE dims, with YaRN (SPEC.md section 4).

Dims: B batch, S sequence, R rope dim (qk_rope_head_dim), R/2 frequency pairs.

The released weights expect *interleaved* pairs (x[2i], x[2i+1]) rotated by angle pos * theta'_i,
as the official complex-number code does; `rope_interleave=False` rotates halves (x[i],
x[i + R/2]) instead, for weights whose RoPE rows were permuted to that layout.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """theta'_i for i in [0, R/2): base frequencies, blended towards theta_i / factor by YaRN."""
  dim = cfg.qk_rope_head_dim
  theta = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_type != "yarn":
    return theta.astype(np.float32)

  def correction_dim(rotations: float) -> float:
    orig = cfg.original_max_position_embeddings
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

  low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001  # Avoids a division by zero, as the reference code does.
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  keep = 1.0 - ramp  # 1: extrapolate (high frequencies), 0: interpolate by the factor.
  blended = theta * keep + theta / cfg.rope_factor * (1.0 - keep)
  return blended.astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
  """Magnitude scale of cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim); 1.0 for V3."""
  if cfg.rope_type != "yarn":
    return 1.0
  if cfg.mscale and cfg.mscale_all_dim:  # As transformers' _compute_yarn_parameters.
    return yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(
      cfg.rope_factor, cfg.mscale_all_dim
    )
  return yarn_mscale(cfg.rope_factor, 1.0)


def softmax_scale(cfg: ModelConfig) -> float:
  """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (V3: 0.13523378)."""
  scale = cfg.qk_head_dim**-0.5
  if cfg.rope_type == "yarn" and cfg.mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  return scale


def apply_rope(x, positions, cfg: ModelConfig):
  """Rotates the last dim of x.

  Args:
    x: [B, S, ..., R] with any number of dims between S and R (e.g. heads).
    positions: int [B, S].
    cfg: supplies the frequencies and the pair layout.

  Returns:
    Same shape and dtype as x; the rotation itself runs in float32.
  """
  inv_freq = jnp.asarray(inverse_frequencies(cfg))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, R/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  factor = attention_factor(cfg)
  cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  if cfg.rope_interleave:
    pairs = x32.reshape(x.shape[:-1] + (half, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
  first, second = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
  return out.astype(x.dtype)
