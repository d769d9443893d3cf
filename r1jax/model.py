"""The DeepSeek-V3 / R1 decoder: embed -> dense blocks -> MoE blocks -> norm -> head (+ MTP).

Dims: b batch, s sequence, m model dim, v vocabulary, n MTP depth.

Usage, as in a notebook:
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg)
    variables = model.init(jax.random.key(0), tokens)          # tokens int32 [b, s]
    logits = model.apply(variables, tokens)                    # float32 [b, s, v]
    logits, mtp_logits = model.apply(variables, tokens, mtp=True)   # mtp_logits [n, b, s, v]
    stats = model.apply(variables, tokens, mutable=["moe_stats"])[1]  # expert load, balance loss

Decoding keeps the compressed MLA cache: `Transformer(cfg, decode=True).init(key, tokens)` with a
[b, max_len] token array sizes it (params identical to the training model's), then
`apply({"params": ..., "cache": ...}, new_tokens, mutable=["cache"])` appends and attends with the
absorbed form. `empty_cache(cfg, batch, max_len)` gives that cache without compiling `init`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.cpu_kernels.small_matmul import small_matmul
from r1jax.layers.block import ACTIVATION_AXES, block_stack
from r1jax.layers.common import dtype_of, kernel_param
from r1jax.layers.mtp import MTPLayer, shift_left
from r1jax.layers.norm import RMSNorm
from r1jax.layers.token_merge import Inflate, merge


class Transformer(nn.Module):
  """DeepSeek-V3-family causal language model with optional multi-token prediction heads."""

  cfg: ModelConfig
  decode: bool = False

  def setup(self):
    cfg = self.cfg
    self.embedding = kernel_param(
      self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg
    )
    if not cfg.tie_word_embeddings:
      self.lm_head = kernel_param(
        self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg
      )
    self.final_norm = RMSNorm(cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    dense, moe = cfg.first_k_dense_replace, cfg.num_moe_layers
    self.dense_layers = block_stack(cfg, False, dense, self.decode) if dense else None
    self.moe_layers = block_stack(cfg, True, moe, self.decode, dense) if moe else None
    if cfg.merges_tokens:
      self.inflate = Inflate(cfg)
    self.mtp_layers = [
      MTPLayer(cfg, self.decode, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)
    ]

  def embed(self, tokens):
    """tokens int [b, s] -> [b, s, m] in the compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(dtype_of(self.cfg.dtype))

  def head(self, h):
    """Final-normed h [b, s, m] -> float32 logits [b, s, v]."""
    h, kernel = h.astype(jnp.float32), self.head_kernel().astype(jnp.float32)
    return small_matmul("bsm,mv->bsv", h, kernel, self.cfg.cpu_kernels)  # decode: C++ on CPU

  def hidden(self, tokens, positions=None, segment_ids=None):
    """tokens [b, s] -> final-normed hidden states [b, s, m] (the trunk without the head)."""
    if positions is None:
      positions = self._default_positions(tokens)
    h = nn.with_logical_constraint(self.embed(tokens), ACTIVATION_AXES)
    if self.cfg.merges_tokens:
      return self.final_norm(self._merged_trunk(h, positions, segment_ids))
    for stack in (self.dense_layers, self.moe_layers):
      if stack is not None:
        h, _ = stack(h, positions, segment_ids)
    return self.final_norm(h)

  def _merged_trunk(self, h, positions, segment_ids):
    """The layers with token merging (r1jax/layers/token_merge.py): [0, merge_layer) on every
    token, [merge_layer, inflate_layer) on the merged slots, the rest on every position again."""
    cfg = self.cfg
    if self.decode:
      raise ValueError(
        "merge_ratio: token merging is a training / full-forward option; decode "
        "with a config whose merge_ratio is 0"
      )
    dense = cfg.first_k_dense_replace

    def run(h, positions, segment_ids, start, stop):
      """Model layers [start, stop) over whichever stacks hold them."""
      for stack, first, count in (
        (self.dense_layers, 0, dense),
        (self.moe_layers, dense, cfg.num_moe_layers),
      ):
        lo, hi = max(start, first), min(stop, first + count)
        if stack is not None and lo < hi:
          h, _ = stack(h, positions, segment_ids, lo - first, hi - first)
      return h

    h = run(h, positions, segment_ids, 0, cfg.merge_layer)
    merged, merged_positions, merged_segments, state = merge(cfg, h, positions, segment_ids)
    band = run(merged, merged_positions, merged_segments, cfg.merge_layer, cfg.inflate_layer)
    h = self.inflate(band, h, state)
    return run(h, positions, segment_ids, cfg.inflate_layer, cfg.num_hidden_layers)

  def __call__(self, tokens, positions=None, segment_ids=None, *, mtp=False):
    """Main-head logits [b, s, v] (float32); with mtp=True also MTP logits [n, b, s, v].

    Args:
      tokens: int32 [b, s].
      positions: int32 [b, s]; default arange(s) (decode: continuing from the cache index).
      segment_ids: int32 [b, s] for packed sequences (attention stays within a segment).
      mtp: also run the multi-token-prediction depths (training).
    """
    if positions is None:
      positions = self._default_positions(tokens)
    h = self.hidden(tokens, positions, segment_ids)
    logits = self.head(h)
    if mtp or (self.is_initializing() and not self.decode):
      # init always builds the MTP params, so one variables tree serves training and inference.
      mtp_out = self.mtp_logits(h, tokens, positions, segment_ids)
      if mtp:
        return logits, mtp_out
    return logits

  def features(self, tokens, positions=None, segment_ids=None):
    """What the training loss needs without the [b, s, v] logits: (h [b, s, m], the MTP depths'
    final-normed hidden states [n, b, s, m], the head [m, v]); logits = h @ head in float32.
    `r1jax.train.losses.lm_losses` turns them into the losses, chunk by chunk if asked."""
    if positions is None:
      positions = self._default_positions(tokens)
    h = self.hidden(tokens, positions, segment_ids)
    chained, mtp_h = h, []
    for k, layer in enumerate(self.mtp_layers, start=1):
      chained, normed = layer(chained, self.embed(shift_left(tokens, k)), positions, segment_ids)
      mtp_h.append(normed)
    mtp_h = jnp.stack(mtp_h) if mtp_h else jnp.zeros((0, *h.shape), h.dtype)
    return h, mtp_h, self.head_kernel()

  def mtp_draft_logits(self, h, next_tokens, positions, segment_ids=None):
    """MTP depth 1 alone: h [b, s, m] (the main model's final-normed hidden states at positions
    i) and next_tokens [b, s] (t_{i+1}) -> logits [b, s, v] for t_{i+2}. With decode=True the
    depth's block appends to its own cache (the drafter of `r1jax.speculative`)."""
    _, normed = self.mtp_layers[0](h, self.embed(next_tokens), positions, segment_ids)
    return self.head(normed)

  def head_kernel(self):
    """The output head [m, v] as stored (the embedding transposed when tied)."""
    return self.embedding.T if self.cfg.tie_word_embeddings else self.lm_head

  def mtp_logits(self, h, tokens, positions, segment_ids=None):
    """Chains the MTP depths from the main hidden states h [b, s, m] -> [n, b, s, v]."""
    outputs = []
    for k, layer in enumerate(self.mtp_layers, start=1):
      h, normed = layer(h, self.embed(shift_left(tokens, k)), positions, segment_ids)
      outputs.append(self.head(normed))
    if not outputs:
      return jnp.zeros((0,) + tokens.shape + (self.cfg.vocab_size,), jnp.float32)
    return jnp.stack(outputs)

  def _default_positions(self, tokens):
    """arange(s), continuing from the cache index when decoding."""
    b, s = tokens.shape
    start = self._cache_index() if self.decode else 0
    return jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))

  def _cache_index(self):
    """Tokens already in the cache (every layer holds the same index); 0 before init."""
    cache = self.variables.get("cache", {})
    while isinstance(cache, dict) and cache:
      if "index" in cache:
        return cache["index"].reshape(-1)[0]
      cache = next(iter(cache.values()))
    return 0


def empty_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  """The decode cache of `Transformer(cfg, decode=True)` for `batch` rows of up to `max_len`
  tokens (`cfg.decode_cache` picks the absorbed latent or the naive per-head form).

  What `init`'s "cache" collection holds (zeros, write index 0), from shapes alone: nothing is
  compiled, where `jax.jit(decoder.init)` compiles the whole model (seconds on a CPU).
  """
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  decoder = Transformer(cfg, decode=True)
  shapes = jax.eval_shape(lambda t: decoder.init(jax.random.key(0), t)["cache"], tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
