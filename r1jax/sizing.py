"""Model sizes from shapes alone: parameter counts and KV-cache bytes, nothing allocated.

`jax.eval_shape` traces `Transformer.init` abstractly, so the counts come from the very modules
that train, and the 671B preset is sized in a second on a laptop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from r1jax.config import ModelConfig
from r1jax.layers.common import dtype_of
from r1jax.model import Transformer


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened param path -> shape, from an abstract init (no memory allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  params = traverse_util.flatten_dict(variables["params"])
  return {path: tuple(_unbox(leaf).shape) for path, leaf in params.items()}


def _unbox(leaf):
  return leaf.value if hasattr(leaf, "value") else leaf


def _is_mtp(path) -> bool:
  return path[0].startswith("mtp_")


def param_count(cfg: ModelConfig, *, include_mtp: bool = False) -> int:
  """Total parameters; the MTP modules only with include_mtp (they share embedding and head)."""
  return sum(
    math.prod(shape)
    for path, shape in param_shapes(cfg).items()
    if include_mtp or not _is_mtp(path)
  )


def active_param_count(
  cfg: ModelConfig, *, include_mtp: bool = False, include_embedding: bool = True
) -> int:
  """Parameters one token is computed with: routed experts count K of E, the rest whole.

  Conventions differ on the input embedding (a lookup that reads one row). Counted whole (the
  default), V3 gives 37.55B, the figure behind DeepSeek's "37B activated". Left out
  (include_embedding=False), V3 gives 36.6B and V2-Lite 2.45B, which are the figures of
  DeepSeek's README_WEIGHTS (36.7B) and V2 paper (2.4B).
  """
  active_fraction = cfg.num_experts_per_tok / cfg.n_routed_experts
  total = 0.0
  for path, shape in param_shapes(cfg).items():
    if (_is_mtp(path) and not include_mtp) or (path == ("embed",) and not include_embedding):
      continue
    routed = len(path) >= 2 and path[-2] == "moe" and path[-1] in ("wi", "wo")
    total += math.prod(shape) * (active_fraction if routed else 1.0)
  return round(total)


def kv_cache_bytes_per_token(cfg: ModelConfig, mode: str = "absorbed") -> int:
  """Decode-cache bytes per token over all main layers, in the compute dtype.

  "absorbed": the normalised latent and the shared roped key, kv_lora_rank + qk_rope_head_dim
  values per layer (576 for V3). "naive": expanded per-head keys and values,
  H * (qk_head_dim + v_head_dim) per layer (40960 for V3).
  """
  if mode == "absorbed":
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  elif mode == "naive":
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  else:
    raise ValueError(f"mode: {mode!r} is not a cache mode; use 'absorbed' or 'naive'")
  return per_layer * cfg.num_hidden_layers * jnp.dtype(dtype_of(cfg.dtype)).itemsize
