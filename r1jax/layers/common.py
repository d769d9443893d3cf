"""Small shared pieces of the layers: dtype lookup, initialisers and logically-named params.

The logical axis vocabulary (mapped to mesh axes by `r1jax.sharding`, never by a layer):
  vocab, embed, q_lora, kv_lora, heads, head_dim, mlp, expert, layers (added by nn.scan),
  and for activations batch, length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG_INF = -1e30  # Masked attention scores: finite, so fully masked rows give a uniform softmax.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  return _DTYPES[name]


def kernel_param(module: nn.Module, name: str, shape, axes, cfg):
  """A weight initialised N(0, initializer_range) in param_dtype, annotated with logical axes."""
  init = nn.initializers.normal(stddev=cfg.initializer_range)
  return module.param(
    name, nn.with_logical_partitioning(init, axes), shape, dtype_of(cfg.param_dtype)
  )


def masked_softmax(scores, mask):
  """Softmax over t in float32. scores [b, s, h, t], mask [b, s, t]."""
  scores = jnp.where(mask[:, :, None, :], scores.astype(jnp.float32), NEG_INF)
  return jax.nn.softmax(scores, axis=-1)
