"""r1jax: DeepSeek-V3 / R1 in JAX.

from r1jax import ModelConfig, Transformer, param_count
cfg = ModelConfig.from_preset("tiny")
model = Transformer(cfg)
variables = model.init(jax.random.key(0), tokens)
logits = model.apply(variables, tokens)
"""

from r1jax.config import PRESETS, ModelConfig
from r1jax.model import Transformer, empty_cache
from r1jax.sizing import active_param_count, kv_cache_bytes_per_token, param_count

__all__ = [
  "PRESETS",
  "ModelConfig",
  "Transformer",
  "active_param_count",
  "empty_cache",
  "kv_cache_bytes_per_token",
  "param_count",
]
