"""Multi-token prediction module (SPEC.md section 6).

Dims: b batch, s sequence, m model dim.

Depth k (1-based) at position i combines the previous depth's representation h^{k-1}_i (h^0: the
main model's final-normed hidden state) with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])    embedding first, as the checkpoint
    h^k  = DecoderBlock(h')                                      causal, same positions
    logits^k_i = head(shared_head_norm(h^k_i))                   predicts t_{i+k+1}
Embedding and head are the main model's (passed in). The last k positions have no t_{i+k}: they
see a padding token and must be masked out of the loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.layers.block import DecoderBlock
from r1jax.layers.common import dtype_of, kernel_param
from r1jax.layers.norm import RMSNorm


def shift_left(tokens, k: int, pad_id: int = 0):
  """tokens [b, s] -> tokens[:, k:] padded with pad_id at the end to length s."""
  if k == 0:
    return tokens
  pad = jnp.full((tokens.shape[0], k), pad_id, tokens.dtype)
  return jnp.concatenate([tokens[:, k:], pad], axis=1)


class MTPLayer(nn.Module):
  """One MTP depth: norms, eh_proj, a full decoder block and the shared-head norm."""

  cfg: ModelConfig
  # Speculative decoding (r1jax.speculative) drafts with depth 1 position by position: its block's
  # MLA then keeps its own cache, over the MTP's own past positions, as in training.
  decode: bool = False

  @nn.compact
  def __call__(self, h_prev, embedded_next, positions, segment_ids=None):
    """h_prev, embedded_next [b, s, m] -> (h [b, s, m], normed output for the head [b, s, m])."""
    cfg = self.cfg
    m = cfg.hidden_size
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, param_dtype=cfg.param_dtype, name=name)
    eh_proj = kernel_param(self, "eh_proj", (2 * m, m), (None, "embed"), cfg)
    joined = jnp.concatenate([norm("enorm")(embedded_next), norm("hnorm")(h_prev)], axis=-1)
    h = jnp.einsum("bsn,nm->bsm", joined, eh_proj.astype(dtype_of(cfg.dtype)))
    # Always a MoE block: the release's layer 61 is one, and transformers builds it so.
    h, _ = DecoderBlock(cfg, use_moe=True, decode=self.decode, name="block")(
      h, positions, segment_ids
    )
    return h, norm("shared_head_norm")(h)
