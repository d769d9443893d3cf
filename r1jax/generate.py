"""Batched sampling: prefill + decode under one `jit`, on the absorbed MLA cache.

Dims: b batch, P prompt slots, N new tokens, v vocabulary.

    gen = Generator(cfg, max_prompt_len=32, max_new_tokens=48)
    prompts, lengths = pad_prompts([[...], [...]], 32, pad_id)     # left-padded int32 [b, P]
    out = gen(variables, prompts, lengths, jax.random.key(0), SamplingConfig(temperature=1.0))
    out.tokens [b, N], out.logprobs [b, N], out.mask [b, N], out.lengths [b]

Prompts are left-padded, so every row's last prompt token sits in slot P - 1 and the cache's
write index is shared by the batch; padding slots are marked invalid in the cache (never
attended to) and each row's RoPE positions count from its first real token. Shapes are static:
the loop always has room for N tokens and stops early once every row has emitted EOS.

Log-probs. `logprobs[i, t]` is log softmax(logits / temperature) at the sampled token: the full
tempered distribution, the one a trainer recomputes (RECIPE.md: sampler and trainer must agree).
top-k / top-p only restrict what is drawn (for evaluation); with temperature 0 the draw is greedy
and log-probs are those of temperature 1.

After a row's EOS the loop keeps feeding it (static shapes) but its later tokens are `pad_id`,
with log-prob 0 and mask 0; `mask` is 1 up to and including the EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig
from r1jax.model import Transformer, empty_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0: greedy. top_k 0 and top_p 1: no truncation."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k: must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: jax.Array  # int32 [b, N]; pad_id after EOS
  logprobs: jax.Array  # float32 [b, N]; log softmax(logits / T) at the token, 0 after EOS
  mask: jax.Array  # int32 [b, N]; 1 through the first EOS
  lengths: jax.Array  # int32 [b]; generated tokens, EOS included


def pad_prompts(prompts: Sequence[Sequence[int]], max_len: int, pad_id: int):
  """Left-pads token lists to int32 [b, max_len]; returns (prompts, lengths [b]).

  Raises:
    ValueError: an empty prompt, or one longer than max_len.
  """
  out = np.full((len(prompts), max_len), pad_id, np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= max_len:
      raise ValueError(f"prompts: prompt {i} has {len(p)} tokens; need 1..{max_len}")
    out[i, max_len - len(p) :] = p
    lengths[i] = len(p)
  return out, lengths


def _truncate(logits, top_k: int, top_p: float):
  """Sets logits outside the top-k and outside the top-p nucleus to -inf (the most likely token
  always stays)."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is < top_p (so the first one always stays).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    keep = (
      jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    )
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_token(logits, rng, sampling: SamplingConfig):
  """logits [b, v] float32 -> (token int32 [b], log-prob [b] under the tempered distribution)."""
  t = sampling.temperature
  if t == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    logp = jax.nn.log_softmax(logits / t, axis=-1)
    drawn = _truncate(logits / t, sampling.top_k, sampling.top_p)
    token = jax.random.categorical(rng, drawn, axis=-1).astype(jnp.int32)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class Generator:
  """A compiled sampler for fixed (batch, prompt slots, new tokens); reuse it across calls."""

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    max_prompt_len: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
  ):
    if max_prompt_len + max_new_tokens > cfg.max_position_embeddings:
      raise ValueError(
        f"max_new_tokens: {max_prompt_len} + {max_new_tokens} slots exceed "
        f"max_position_embeddings={cfg.max_position_embeddings}"
      )
    self.cfg, self.eos_id, self.pad_id = cfg, eos_id, pad_id
    self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
    self._decoder = Transformer(cfg, decode=True)
    self._run = jax.jit(self._generate, static_argnames="sampling")

  def __call__(self, variables, prompts, lengths, rng, sampling: SamplingConfig = SamplingConfig()):
    """variables {"params", "router_bias"}; prompts int32 [b, P] left-padded (`pad_prompts`),
    lengths [b] -> Generation."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.shape[1] != self.max_prompt_len:
      raise ValueError(
        f"prompts: {prompts.shape[1]} slots, this generator takes {self.max_prompt_len}"
      )
    return self._run(variables, prompts, jnp.asarray(lengths, jnp.int32), rng, sampling=sampling)

  def _empty_cache(self, batch: int):
    return empty_cache(self.cfg, batch, self.max_prompt_len + self.max_new_tokens)

  def _step(self, variables, cache, tokens, positions, segment_ids):
    """Feeds tokens [b, s] at the cache index; returns (last position's logits [b, v], cache)."""
    logits, updated = self._decoder.apply(
      {**variables, "cache": cache}, tokens, positions, segment_ids, mutable=["cache"]
    )
    return logits[:, -1], updated["cache"]

  def _generate(self, variables, prompts, lengths, rng, sampling):
    variables = {k: v for k, v in variables.items() if k in ("params", "router_bias")}
    b, p = prompts.shape
    n = self.max_new_tokens
    slot = jnp.arange(p, dtype=jnp.int32)[None, :]
    first = p - lengths[:, None]  # each row's first real slot
    real = (slot >= first).astype(jnp.int32)
    positions = jnp.maximum(slot - first, 0)
    logits, cache = self._step(variables, self._empty_cache(b), prompts, positions, real)
    rng, key = jax.random.split(rng)
    token, logp = sample_token(logits, key, sampling)
    out = {
      "tokens": jnp.full((b, n), self.pad_id, jnp.int32).at[:, 0].set(token),
      "logprobs": jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp),
    }
    done = token == self.eos_id

    def cond(carry):
      t, _, _, _, done, _ = carry
      return (t < n) & ~jnp.all(done)

    def body(carry):
      t, token, cache, out, done, rng = carry
      logits, cache = self._step(variables, cache, token[:, None], (lengths + t - 1)[:, None], None)
      rng, key = jax.random.split(rng)
      new, logp = sample_token(logits, key, sampling)
      new = jnp.where(done, self.pad_id, new)
      logp = jnp.where(done, 0.0, logp)
      out = {
        "tokens": out["tokens"].at[:, t].set(new),
        "logprobs": out["logprobs"].at[:, t].set(logp),
      }
      return t + 1, new, cache, out, done | (new == self.eos_id), rng

    _, _, _, out, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), token, cache, out, done, rng)
    )
    is_eos = out["tokens"] == self.eos_id
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before each position
    mask = (before == 0).astype(jnp.int32)
    # Rows stopped early by the loop (all done) have pad_id tokens past their EOS: mask 0.
    return Generation(out["tokens"], out["logprobs"] * mask, mask, mask.sum(axis=-1))


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def sequence_logprobs(
  model: Transformer,
  variables: dict[str, Any],
  tokens,
  positions,
  segment_ids,
  temperature: float = 1.0,
):
  """What a trainer recomputes: log softmax(logits / T) of tokens[:, i + 1] at position i,
  [b, s - 1], by one full forward (no cache); T 0 reads as 1. GRPO's loss
  (`r1jax.train.grpo.completion_logprobs`) differentiates through this same function."""
  logits = model.apply(variables, tokens, positions, segment_ids)
  t = temperature if temperature > 0 else 1.0
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / t, axis=-1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
