"""Greedy speculative decoding with the MTP module as the drafter (SPEC.md section 6.4).

Dims: b batch, P prompt slots, N new tokens, v vocabulary, m model dim.

    gen = SpeculativeGenerator(cfg, max_prompt_len=32, max_new_tokens=48, eos_id=eos)
    out = gen(variables, prompts, lengths)         # prompts left-padded as `pad_prompts` makes
    out.generation      the `Generation` plain greedy decoding returns, token for token
    out.acceptance_rate accepted drafts / drafts proposed; out.steps verify forwards (no prefill)

Algorithm. MTP depth 1 at position i reads the main model's final-normed h_i and Emb(t_{i+1})
and predicts t_{i+2}. With t_j the newest accepted token (not yet fed to the main model) and d
the draft for t_{j+1}, one step:
  1. verify: the main model takes [t_j, d] at positions j, j + 1 through its cache; greedy g1 at j
     is t_{j+1}, and g2 at j + 1 is t_{j+2} if d == g1 (accept) and means nothing otherwise.
  2. draft: the MTP takes [(h_j, g1), (h_{j+1}, g2)] through its own cache; its output at j
     predicts t_{j+2} (the next draft after a rejection), at j + 1 t_{j+3} (after an acceptance).
     The first entry is right either way (g1 is t_{j+1} whether or not d was).
  3. emit g1, and g2 too on acceptance; the newest token is then g2 (or g1).
The prefill runs the prompt through the main model (t_L = its greedy choice) and then the MTP over
[(h_i, t_{i+1})] for i < L, t_L filling the last, which drafts t_{L+1}.

Caches. The main model's and the MTP block's MLA caches are written in lockstep: slot k of both
holds position k's entry, each step writes two slots (start, start + 1) for every row, and the
second holds a row's draft, right or wrong. Rows accept independently, and the slot index is
shared by the batch (`r1jax.layers.mla`), so a rejection does not move a row back: after the
step, every layer's `valid[row, start + 1]` is set to whether that row accepted, and a rejected
draft's slot becomes a hole no later query attends to (the mask drops it: exactly zero weight,
not approximately). RoPE positions are per row and count accepted tokens only, so a hole shifts
nothing. When no row accepted, the index rolls back by one and the next step overwrites the slot
(a batch of one never leaves a hole). Worst case every step leaves a hole: the caches hold
P + 2 (N - 1) slots, against P + N for `Generator`.

Exactness: every token is the main model's argmax given the accepted tokens before it, as in
plain greedy decoding; only the shapes of the computation differ (two query rows, a longer cache
with masked holes), so the float rounding may differ. Measured (2026-11-24): float32 on CPU, and
float32 on an H100 with jax_default_matmul_precision=highest, gave `Generator`'s tokens exactly
(small preset, 8 rows x 256 tokens); on the H100 at the default precision (TF32 products) and in
bfloat16 the two diverged after 30-120 tokens at a near-tie of a random model's logits, as any
change of batch shape can make them do.

Cost (small preset, H100, bf16, batch 8, 256 new tokens): a step verifies 2 tokens
and runs the MTP block, ~1.2x a plain step; with every draft accepted, 128 steps instead of 255,
1.6x plain greedy's tokens/s; with none accepted 0.84x.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.generate import Generation
from r1jax.model import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeGeneration:
  generation: Generation  # what `Generator` returns at temperature 0
  drafts: jax.Array  # int32 [b, N]; the MTP's draft of each generated token, -1 where none
  proposed: jax.Array  # int32 [b]; drafts verified
  accepted: jax.Array  # int32 [b]; drafts equal to the main model's greedy token
  steps: jax.Array  # int32 []; main-model verify forwards after the prefill

  @property
  def acceptance_rate(self) -> jax.Array:
    """Accepted drafts / drafts proposed over the batch (0 when none was proposed)."""
    return self.accepted.sum() / jnp.maximum(self.proposed.sum(), 1)


def _greedy(logits):
  """logits [b, s, v] -> (argmax int32 [b, s], its log softmax [b, s]), as `sample_token` at T 0."""
  token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return token, jnp.take_along_axis(logp, token[..., None], axis=-1)[..., 0]


def _prefill(model: Transformer, prompts, positions, real):
  """The prompt through the main model, then the MTP: (first token [b], its log-prob [b], the
  draft of the second [b])."""
  h = model.hidden(prompts, positions, real)
  # The head over every slot, then the last one, as `Generator` does: the same product shapes.
  first, logp = _greedy(model.head(h)[:, -1:])
  after = jnp.concatenate([prompts[:, 1:], first], axis=1)  # t_{i+1} for slot i
  draft, _ = _greedy(model.mtp_draft_logits(h, after, positions, real)[:, -1:])
  return first[:, 0], logp[:, 0], draft[:, 0]


def _verify_and_draft(model: Transformer, tokens, positions):
  """tokens [b, 2] = [newest accepted, draft] -> (greedy [b, 2], log-probs [b, 2], the MTP's
  drafts [b, 2]: column 0 for t_{j+2}, column 1 for t_{j+3})."""
  h = model.hidden(tokens, positions)
  greedy, logp = _greedy(model.head(h))
  drafts, _ = _greedy(model.mtp_draft_logits(h, greedy, positions))
  return greedy, logp, drafts


def _cache_shapes(model: Transformer, tokens):
  """Init-time call that creates both caches (main layers and the MTP block)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return model.mtp_draft_logits(model.hidden(tokens, positions), tokens, positions)


def settle_cache(cache, start, accepted, advance):
  """After a verify step that wrote slots start and start + 1 of every layer: marks slot
  start + 1 valid only for the rows that accepted (accepted bool [b]) and sets the write index to
  start + advance. Works on any layer layout (scanned leaves [layers, b, T], unrolled [b, T]): it
  reads only the leaf names MLA's cache uses."""

  def settle(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "index":
      return jnp.full_like(leaf, start + advance)
    if name == "valid":
      return leaf.at[..., start + 1].set(accepted)
    return leaf

  return jax.tree_util.tree_map_with_path(settle, cache)


class SpeculativeGenerator:
  """Compiled greedy speculative decoding for fixed (batch, prompt slots, new tokens)."""

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    max_prompt_len: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
  ):
    if cfg.num_nextn_predict_layers < 1:
      raise ValueError("num_nextn_predict_layers: the drafter is MTP depth 1; this model has none")
    if any(cfg.attention_windows):
      # Rejected drafts leave holes in the cache, and a local window counts slots, not tokens.
      raise ValueError(
        "attention_windows: speculative decoding needs global attention in every layer"
      )
    if max_prompt_len + max_new_tokens > cfg.max_position_embeddings:
      raise ValueError(
        f"max_new_tokens: {max_prompt_len} + {max_new_tokens} positions exceed "
        f"max_position_embeddings={cfg.max_position_embeddings}"
      )
    self.cfg, self.eos_id, self.pad_id = cfg, eos_id, pad_id
    self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
    self.cache_slots = max_prompt_len + 2 * max(max_new_tokens - 1, 0)
    self._decoder = Transformer(cfg, decode=True)
    self._run = jax.jit(self._generate)

  def __call__(self, variables, prompts, lengths) -> SpeculativeGeneration:
    """variables {"params", "router_bias"} with the MTP's; prompts int32 [b, P] left-padded
    (`r1jax.generate.pad_prompts`), lengths [b]."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.shape[1] != self.max_prompt_len:
      raise ValueError(
        f"prompts: {prompts.shape[1]} slots, this generator takes {self.max_prompt_len}"
      )
    return self._run(variables, prompts, jnp.asarray(lengths, jnp.int32))

  def _empty_cache(self, batch: int):
    slots = jnp.zeros((batch, self.cache_slots), jnp.int32)
    init = lambda t: self._decoder.init(jax.random.key(0), t, method=_cache_shapes)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init, slots))

  def _apply(self, variables, cache, fn, *args):
    """fn(model, *args) on the decoding model -> (its output, the updated cache)."""
    out, updated = self._decoder.apply(
      {**variables, "cache": cache}, *args, method=fn, mutable=["cache"]
    )
    return out, updated["cache"]

  def _generate(self, variables, prompts, lengths):
    variables = {k: v for k, v in variables.items() if k in ("params", "router_bias")}
    b, p = prompts.shape
    n = self.max_new_tokens
    slot = jnp.arange(p, dtype=jnp.int32)[None, :]
    first_slot = p - lengths[:, None]
    real = (slot >= first_slot).astype(jnp.int32)
    positions = jnp.maximum(slot - first_slot, 0)
    (token, logp, draft), cache = self._apply(
      variables, self._empty_cache(b), _prefill, prompts, positions, real
    )
    # Two spare columns: n takes a step's second token past the end, n + 1 the rows that write
    # nothing (scatter needs a column).
    state = {
      "tokens": jnp.full((b, n + 2), self.pad_id, jnp.int32).at[:, 0].set(token),
      "logprobs": jnp.zeros((b, n + 2), jnp.float32).at[:, 0].set(logp),
      "drafts": jnp.full((b, n + 2), -1, jnp.int32),
      "newest": token,  # t_j
      "draft": draft,  # of t_{j+1}
      "count": jnp.ones((b,), jnp.int32),
      "done": (token == self.eos_id) | (n <= 1),
      "proposed": jnp.zeros((b,), jnp.int32),
      "accepted": jnp.zeros((b,), jnp.int32),
      "slot": jnp.int32(p),
      "steps": jnp.int32(0),
      "cache": cache,
    }
    cond = lambda s: ~jnp.all(s["done"])
    state = jax.lax.while_loop(cond, lambda s: self._step(variables, lengths, s), state)
    return self._finish(state)

  def _step(self, variables, lengths, s):
    """One verify + draft step (module docstring) on the loop state s."""
    b, n = lengths.shape[0], self.max_new_tokens
    active, count = ~s["done"], s["count"]
    position = lengths + count - 1  # of the newest token: accepted tokens only
    positions = position[:, None] + jnp.arange(2, dtype=jnp.int32)
    inputs = jnp.stack([s["newest"], s["draft"]], axis=1)
    (greedy, logp, drafts), cache = self._apply(
      variables, s["cache"], _verify_and_draft, inputs, positions
    )
    accept = active & (s["draft"] == greedy[:, 0])
    rows, spare = jnp.arange(b), n + 1
    first_col = jnp.where(active, count, spare)
    second_col = jnp.where(accept, count + 1, spare)
    out = {}
    for name, values in (("tokens", greedy), ("logprobs", logp)):
      buf = s[name].at[rows, first_col].set(values[:, 0])
      out[name] = buf.at[rows, second_col].set(values[:, 1])
    out["drafts"] = s["drafts"].at[rows, first_col].set(s["draft"])
    count = count + active + accept
    eos = (active & (greedy[:, 0] == self.eos_id)) | (accept & (greedy[:, 1] == self.eos_id))
    advance = 1 + jnp.any(accept).astype(jnp.int32)
    return {
      **out,
      "newest": jnp.where(accept, greedy[:, 1], greedy[:, 0]),
      "draft": jnp.where(accept, drafts[:, 1], drafts[:, 0]),
      "count": count,
      "done": s["done"] | eos | (count >= n),
      "proposed": s["proposed"] + active,
      "accepted": s["accepted"] + accept,
      "slot": s["slot"] + advance,
      "steps": s["steps"] + 1,
      "cache": settle_cache(cache, s["slot"], accept, advance),
    }

  def _finish(self, s) -> SpeculativeGeneration:
    """Masks as `Generator` does: 1 through the first EOS, pad_id and log-prob 0 after it."""
    n = self.max_new_tokens
    tokens = s["tokens"][:, :n]
    written = jnp.arange(n)[None, :] < s["count"][:, None]
    is_eos = written & (tokens == self.eos_id)
    before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before each position
    mask = (written & (before == 0)).astype(jnp.int32)
    generation = Generation(
      jnp.where(mask == 1, tokens, self.pad_id),
      s["logprobs"][:, :n] * mask,
      mask,
      mask.sum(axis=-1),
    )
    drafts = jnp.where(mask == 1, s["drafts"][:, :n], -1)
    return SpeculativeGeneration(generation, drafts, s["proposed"], s["accepted"], s["steps"])
