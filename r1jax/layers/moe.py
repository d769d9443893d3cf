"""DeepSeekMoE block: router, routed experts, shared experts (SPEC.md section 5).

Dims: b batch, s sequence, T = b*s tokens, m model dim, E routed experts, K top-k, f expert ffn.

Algorithm, per token x:
  1. logits = x @ gate [m, E] in float32; s = sigmoid(logits) (V3) or softmax (V2).
  2. Selection uses s + correction_bias (V3 only; the bias never enters the weights), limited to
     the best `topk_group` of `n_group` groups (group score: top-2 sum for V3, max for V2).
  3. weights = s at the chosen experts, renormalised if `norm_topk_prob`, times
     `routed_scaling_factor`.
  4. out = sum_k weights_k * Expert_k(x) + SharedExperts(x); the routed part runs through the
     dispatch ops (permute -> grouped matmul -> unpermute), dropless unless a capacity factor
     is set.

State outside the gradient, each in its own collection:
  "router_bias"  correction_bias [E] float32: moved by +-gamma toward balance by the trainer.
  "moe_stats"    expert_load [E] (tokens routed to each expert this step), balance_loss (the
                 sequence-wise loss, already times aux_loss_alpha) and router_z (ST-MoE's
                 z-loss, mean over tokens of logsumexp(logits)^2, unweighted: the trainer
                 weights it); written only when the collection is mutable in `apply`.
  "routing"      expert_ids [b, s, K] int32 and weights [b, s, K] float32: each token's chosen
                 experts, for inspection (a notebook's routing table); written only when the
                 collection is mutable, so training never pays for it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from r1jax import expert_parallel
from r1jax.config import ModelConfig
from r1jax.layers.common import dtype_of, kernel_param
from r1jax.layers.mlp import MLP


def route_tokens(logits, bias, cfg: ModelConfig):
  """logits [T, E] float32, bias [E] or None -> weights [T, K] float32, experts [T, K] int32 and
  counts [E] int32 (pairs routed to each expert)."""
  return pallas_kernels.route_with_counts(
    logits,
    bias,
    top_k=cfg.num_experts_per_tok,
    score_func=cfg.score_func,
    n_group=cfg.n_group if cfg.group_score else 1,
    topk_group=cfg.topk_group if cfg.group_score else 1,
    group_score=cfg.group_score or "max",
    norm_topk_prob=cfg.norm_topk_prob,
    routed_scaling_factor=cfg.routed_scaling_factor,
    impl=cfg.moe_impl,
  )


def sequence_balance_loss(scores, experts, num_experts: int, batch: int):
  """V3's complementary sequence-wise balance loss, before the alpha weight.

  For each sequence of S tokens: f_i = E / (K S) * #{t: i in topk_t}, P_i = mean_t s_{i,t} /
  sum_j s_{j,t}; loss = sum_i f_i P_i, averaged over sequences. scores [T, E], experts [T, K].
  """
  t, k = experts.shape
  seq = t // batch
  counts = jax.nn.one_hot(experts.reshape(batch, seq * k), num_experts, dtype=jnp.float32)
  f = counts.sum(axis=1) * (num_experts / (k * seq))  # [b, E]
  normalised = scores / jnp.sum(scores, axis=-1, keepdims=True)
  p = normalised.reshape(batch, seq, num_experts).mean(axis=1)  # [b, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nn.Module):
  """Router + routed experts (dispatch ops) + shared experts."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):  # [b, s, m] -> [b, s, m]
    cfg = self.cfg
    b, s, m = x.shape
    e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    gate = kernel_param(self, "gate", (m, e), ("embed", None), cfg)
    wi = kernel_param(self, "wi", (e, m, 2, f), ("expert", "embed", None, "mlp"), cfg)
    wo = kernel_param(self, "wo", (e, f, m), ("expert", "mlp", "embed"), cfg)
    bias = None
    if cfg.use_correction_bias:
      bias = self.variable("router_bias", "correction_bias", jnp.zeros, (e,), jnp.float32).value

    out = jnp.zeros_like(x)
    if cfg.n_shared_experts:
      out = MLP(cfg, cfg.n_shared_experts * f, name="shared_experts")(x)
    if self.is_initializing():
      # init needs the params only; XLA cannot drop the dispatch loops as dead code (measured:
      # the tiny model's jitted init compiled in 12.1 s with them, 8.8 s without).
      return out
    tokens = x.reshape(b * s, m)
    logits = jnp.einsum("tm,me->te", tokens.astype(jnp.float32), gate.astype(jnp.float32))
    dtype = dtype_of(cfg.dtype)
    routed, experts, counts = expert_parallel.route_and_run(
      tokens,
      logits,
      bias,
      # [e, m, 2, f] -> h [T*K, 2f], gate columns then up: one grouped matmul. Not reshaped
      # here: under the layer scan the backward then keeps the param slice, not a copy.
      wi.astype(dtype),
      wo.astype(dtype),
      route=lambda logits, bias: route_tokens(logits, bias, cfg),
      impl=cfg.moe_impl,
      capacity_factor=cfg.capacity_factor,
      exchange=cfg.expert_exchange,
      cpu_kernel=cfg.cpu_kernels,
    )
    if self.is_mutable_collection("moe_stats"):
      self._record_stats(logits, experts, counts, b)
    if self.is_mutable_collection("routing"):
      # Routed again outside the dispatch (cheap, deterministic): the same choice, with weights.
      weights, chosen, _ = route_tokens(logits, bias, cfg)
      k = cfg.num_experts_per_tok
      self.variable(
        "routing", "expert_ids", jnp.zeros, (b, s, k), jnp.int32
      ).value = chosen.reshape(b, s, k)
      self.variable(
        "routing", "weights", jnp.zeros, (b, s, k), jnp.float32
      ).value = weights.reshape(b, s, k)
    return out + routed.reshape(b, s, m)

  def _record_stats(self, logits, experts, counts, batch):
    cfg = self.cfg
    e = cfg.n_routed_experts
    load = counts.astype(jnp.float32)
    scores = pallas_kernels.router_scores(logits, cfg.score_func)
    loss = cfg.aux_loss_alpha * sequence_balance_loss(scores, experts, e, batch)
    self.variable("moe_stats", "expert_load", jnp.zeros, (e,), jnp.float32).value = load
    self.variable("moe_stats", "balance_loss", jnp.zeros, (), jnp.float32).value = loss
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
    self.variable("moe_stats", "router_z", jnp.zeros, (), jnp.float32).value = z
