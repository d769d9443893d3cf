"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (SPEC.md section 2).

Dims: T tokens (any leading dims), m model dim, f ffn dim, g the gate/up pair (2).
Weights: wi [m, 2, f] holds gate (g=0) and up (g=1) so that one matmul computes both and a
sharded f axis keeps each gate column beside its up column; wo [f, m].
"""

from __future__ import annotations

import flax.linen as nn
import jax

from r1jax.config import ModelConfig
from r1jax.cpu_kernels.small_matmul import small_matmul
from r1jax.layers.common import dtype_of, kernel_param


def swiglu(h):
  """h [..., 2, f] (gate, up) -> silu(gate) * up [..., f]."""
  return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


class MLP(nn.Module):
  """Dense SwiGLU with intermediate size `ffn_dim` (dense layers and shared experts)."""

  cfg: ModelConfig
  ffn_dim: int

  @nn.compact
  def __call__(self, x):  # [..., m] -> [..., m]
    cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
    wi = kernel_param(self, "wi", (cfg.hidden_size, 2, self.ffn_dim), ("embed", None, "mlp"), cfg)
    wo = kernel_param(self, "wo", (self.ffn_dim, cfg.hidden_size), ("mlp", "embed"), cfg)
    # decode sizes on XLA:CPU: r1jax.cpu_kernels.small_matmul; otherwise the einsums themselves
    h = small_matmul("...m,mgf->...gf", x, wi.astype(dtype), cfg.cpu_kernels)
    return small_matmul("...f,fm->...m", swiglu(h), wo.astype(dtype), cfg.cpu_kernels)
