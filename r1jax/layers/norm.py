"""RMSNorm, computed in float32 whatever the activation dtype (SPEC.md section 2).

Dims: D normalised feature dim (hidden size, q_lora_rank or kv_lora_rank).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from r1jax.layers.common import dtype_of


def rms_norm(x, scale, eps: float):
  """y = x * rsqrt(mean(x^2) + eps) * scale over the last dim, in float32, cast back to x.dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nn.Module):
  """Learned-scale RMSNorm with no bias. `axis_name` is the logical name of the D axis."""

  eps: float = 1e-6
  axis_name: str = "embed"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D]
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
      (x.shape[-1],),
      dtype_of(self.param_dtype),
    )
    return rms_norm(x, scale, self.eps)
