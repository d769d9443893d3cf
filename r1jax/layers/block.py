"""One pre-norm decoder block: h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h)).

Dims: b batch, s sequence, m model dim. The FFN is a dense SwiGLU for the first
`first_k_dense_replace` layers and a DeepSeekMoE block after that.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from r1jax.config import ModelConfig
from r1jax.layers.mla import MLA
from r1jax.layers.mlp import MLP
from r1jax.layers.moe import MoE
from r1jax.layers.norm import RMSNorm

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
  """Attention and FFN sub-blocks with their pre-norms; usable under nn.scan (returns a carry)."""

  cfg: ModelConfig
  use_moe: bool
  decode: bool = False
  window: int = 0  # local attention over this many tokens (0: global)

  @nn.compact
  def __call__(self, h, positions, segment_ids=None):
    """h [b, s, m] -> (h [b, s, m], None); the None makes the block a scan body."""
    cfg = self.cfg
    h = nn.with_logical_constraint(h, ACTIVATION_AXES)
    attn_in = RMSNorm(cfg.rms_norm_eps, param_dtype=cfg.param_dtype, name="attn_norm")(h)
    h = h + MLA(cfg, self.decode, self.window, name="attn")(attn_in, positions, segment_ids)
    ffn_in = RMSNorm(cfg.rms_norm_eps, param_dtype=cfg.param_dtype, name="ffn_norm")(h)
    if self.use_moe:
      h = h + MoE(cfg, name="moe")(ffn_in)
    else:
      h = h + MLP(cfg, cfg.intermediate_size, name="mlp")(ffn_in)
    return nn.with_logical_constraint(h, ACTIVATION_AXES), None


def remat_block(cfg: ModelConfig, decode: bool, prevent_cse: bool):
  """DecoderBlock under cfg.remat (training only: decoding has no backward)."""
  if cfg.remat == "none" or decode:
    return DecoderBlock
  policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(DecoderBlock, policy=policy, prevent_cse=prevent_cse)


def block_stack(cfg: ModelConfig, use_moe: bool, length: int, decode: bool, first_layer: int = 0):
  """`length` DecoderBlocks (model layers first_layer, first_layer + 1, ...) with params stacked
  on a leading "layers" axis.

  nn.scan traces the block once, so compile time does not grow with depth. Non-param state
  (cache, router bias, MoE statistics) is stacked per layer the same way.
  """
  if not cfg.scan_layers:
    return _Unrolled(cfg, use_moe, length, decode, first_layer)
  scanned = nn.scan(
    remat_block(cfg, decode, prevent_cse=False),  # scan already keeps XLA from merging layers
    variable_axes={"params": 0, "cache": 0, "router_bias": 0, "moe_stats": 0, "routing": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, nn.broadcast),
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(cfg, use_moe, decode)


class _Unrolled(nn.Module):
  """The same stack as a Python loop (scan_layers=False), e.g. to inspect one layer; its layers
  may differ (`ModelConfig.attention_windows`), and a call may run a range of them (token
  merging changes the stream between two calls)."""

  cfg: ModelConfig
  use_moe: bool
  length: int
  decode: bool
  first_layer: int = 0

  @nn.compact
  def __call__(self, h, positions, segment_ids=None, start: int = 0, stop: int | None = None):
    for i in range(self.length)[start:stop]:
      block = remat_block(self.cfg, self.decode, prevent_cse=True)
      window = self.cfg.window(self.first_layer + i)
      h, _ = block(self.cfg, self.use_moe, self.decode, window, name=f"layer_{i}")(
        h, positions, segment_ids
      )
    return h, None
