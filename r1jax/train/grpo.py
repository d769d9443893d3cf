"""GRPO's objective (DeepSeekMath section 4.1; ../shared/RECIPE.md "GRPO, exactly").

Dims: P prompts, G completions per prompt, N = P * G completions, L completion tokens.

For each prompt the rollout policy pi_old samples G completions with rewards r [P, G].
  advantage    A_i = (r_i - mean(r)) / (std(r) + eps)   (no std: r_i - mean(r), Dr. GRPO)
               shared by every token of completion i
  ratio        rho_t = exp(logp_t - old_logp_t)
  surrogate    min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
  KL to pi_ref per token, in the loss: k3 = exp(ref - logp) - (ref - logp) - 1 (default) or
               k2 = (logp - ref)^2 / 2
  token loss   -(surrogate - beta * kl)
  aggregation  grpo:    mean over each completion's tokens, then over completions
               dapo:    sum over all tokens / active tokens
               dr_grpo: sum over all tokens / (N * L)

`mask` [N, L] marks the completion tokens that count: up to and including the first EOS
(`mask_after_eos`), never the padding after it; log-probs come from the same tempered
distribution the sampler drew from. With one update per rollout (mu = 1) rho is 1, the surrogate
is the advantage itself (mean 0 per group, so under `grpo` the loss value is beta * KL), and yet
its gradient is the policy gradient: watch rewards, lengths and KL, not the loss.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r1jax.generate import sequence_logprobs

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k3", "k2")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The objective's options; validated on construction (one-line errors naming the field)."""

  group_size: int = 8  # G
  eps_low: float = 0.2
  eps_high: float = 0.28  # DAPO's asymmetric clip; set to eps_low for the symmetric one
  beta: float = 0.001  # KL weight (R1's); 0 drops the reference model
  kl_estimator: str = "k3"
  loss_aggregation: str = "grpo"
  scale_advantages: bool = True  # divide by the group's std (Dr. GRPO: False)
  drop_zero_std_groups: bool = False  # DAPO: groups whose rewards are all equal add nothing
  updates_per_rollout: int = 1  # mu
  reference_reset_every: int = 0  # replace pi_ref by the policy every N iterations; 0: never
  advantage_eps: float = 1e-4

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"group_size: GRPO compares completions, needs >= 2, got {self.group_size}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(
        f"kl_estimator: unknown {self.kl_estimator!r}; choose one of {KL_ESTIMATORS}"
      )
    if self.loss_aggregation not in AGGREGATIONS:
      raise ValueError(
        f"loss_aggregation: unknown {self.loss_aggregation!r}; choose one of {AGGREGATIONS}"
      )
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
      raise ValueError("eps_low, eps_high: need 0 <= eps_low < 1 and eps_high >= 0")
    if self.beta < 0 or self.updates_per_rollout < 1 or self.reference_reset_every < 0:
      raise ValueError(
        "beta, updates_per_rollout, reference_reset_every: beta >= 0, mu >= 1, reset >= 0"
      )


def group_advantages(rewards, scale: bool = True, eps: float = 1e-4):
  """rewards [P, G] -> (advantages [P, G], zero_std [P] bool: all rewards of the group equal).

  The std is the population std over the group (numpy's default ddof=0).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  centred = rewards - rewards.mean(axis=-1, keepdims=True)
  std = rewards.std(axis=-1, keepdims=True)
  zero_std = jnp.max(rewards, axis=-1) == jnp.min(rewards, axis=-1)
  if scale:  # a group of equal rewards has nothing to compare: 0, whatever eps is
    advantages = jnp.where(zero_std[:, None], 0.0, centred / (std + eps))
  else:
    advantages = centred
  return advantages, zero_std


def mask_after_eos(tokens, eos_id: int, valid=None):
  """int32 [N, L]: 1 on every completion token up to and including the first EOS, 0 after it
  (a completion with no EOS counts all its tokens; `valid` [N, L] may mask more, e.g. padding)."""
  tokens = jnp.asarray(tokens)
  is_eos = tokens == eos_id
  # EOS strictly before t: the running count of EOS at positions < t.
  before = jnp.cumsum(is_eos, axis=-1) - is_eos
  mask = (before == 0).astype(jnp.int32)
  return mask if valid is None else mask * jnp.asarray(valid, jnp.int32)


def kl_per_token(logp, ref_logp, estimator: str = "k3"):
  """The per-token KL(pi_theta || pi_ref) estimate at the sampled tokens."""
  if estimator == "k3":
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0
  if estimator == "k2":
    return 0.5 * jnp.square(logp - ref_logp)
  raise ValueError(f"kl_estimator: unknown {estimator!r}; choose one of {KL_ESTIMATORS}")


def aggregate(token_values, mask, how: str):
  """Reduces [N, L] per-token values over the masked tokens, as `how` says (module docstring)."""
  mask = mask.astype(jnp.float32)
  values = token_values * mask
  if how == "grpo":
    per_sequence = values.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)
    return per_sequence.mean()
  if how == "dapo":
    return values.sum() / jnp.maximum(mask.sum(), 1.0)
  if how == "dr_grpo":
    return values.sum() / (mask.shape[0] * mask.shape[1])
  raise ValueError(f"loss_aggregation: unknown {how!r}; choose one of {AGGREGATIONS}")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, cfg: GRPOConfig):
  """The GRPO loss and its diagnostics.

  Args:
    logp: [N, L] log-probs of the sampled tokens under the policy being trained.
    old_logp: [N, L] the same under the rollout policy (constants).
    ref_logp: [N, L] the same under the frozen reference, or None when beta is 0.
    advantages: [N] one per completion (`group_advantages`, flattened).
    mask: [N, L] tokens that count (`mask_after_eos`).

  Returns:
    (loss, {"kl", "clip_fraction", "ratio_mean"}) with the diagnostics averaged over the masked
    tokens (kl is 0 without a reference).
  """
  old_logp = jax.lax.stop_gradient(old_logp)
  a = advantages[:, None].astype(jnp.float32)
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  surrogate = jnp.minimum(ratio * a, clipped * a)
  kl = jnp.zeros_like(logp)
  if ref_logp is not None and cfg.beta > 0:
    kl = kl_per_token(logp, jax.lax.stop_gradient(ref_logp), cfg.kl_estimator)
  loss = aggregate(-(surrogate - cfg.beta * kl), mask, cfg.loss_aggregation)
  # Clipping binds where the clipped term is the smaller one and differs from the unclipped.
  binds = (clipped * a < ratio * a) & (clipped != ratio)
  m = mask.astype(jnp.float32)
  tokens = jnp.maximum(m.sum(), 1.0)
  metrics = {
    "kl": jnp.sum(kl * m) / tokens,
    "clip_fraction": jnp.sum(binds * m) / tokens,
    "ratio_mean": jnp.sum(ratio * m) / tokens,
  }
  return loss, metrics


def token_entropy(logits, mask):
  """Mean entropy of the (already tempered) distributions [N, L, V] over the masked tokens."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  m = mask.astype(jnp.float32)
  return jnp.sum(entropy * m) / jnp.maximum(m.sum(), 1.0)


# ------------------------------------------------------------------------ the policy update


def completion_logprobs(model, variables, tokens, positions, segment_ids, temperature: float):
  """log softmax(logits / T) of tokens[:, t] given tokens[:, :t], at t = 1..s-1 -> [N, s - 1]
  (the sampler's tempered distribution, as `r1jax.generate` reports it; T 0 reads as 1).

  The sampler's own recomputation, so that sampler and trainer cannot drift apart; differentiable
  (a jit nested in the update's jit is inlined)."""
  return sequence_logprobs(model, variables, tokens, positions, segment_ids, temperature)


def make_policy_update(model, optimizer, cfg: GRPOConfig, temperature: float):
  """A jitted (state, batch) -> (state, metrics): one optimizer step on the GRPO loss.

  `state` is r1jax.train.step.TrainState (the router bias is kept as is: RL leaves the
  correction bias alone). `batch` holds, for N = P * G rollouts of S = prompt + completion
  slots (prompts left-padded):
    tokens, positions, segment_ids  int32 [N, S]   (segment_ids 0 on padding)
    mask         int32 [N, S - 1]  1 where target token t + 1 is a counted completion token
    old_logp     float32 [N, S - 1] the rollout policy's log-probs of the targets
    ref_logp     float32 [N, S - 1] the reference's (ignored when beta is 0)
    advantages   float32 [N]
  """

  def loss_fn(params, state, batch):
    variables = {"params": params, "router_bias": state.router_bias}
    logp = completion_logprobs(
      model, variables, batch["tokens"], batch["positions"], batch["segment_ids"], temperature
    )
    ref = batch["ref_logp"] if cfg.beta > 0 else None
    loss, metrics = grpo_loss(logp, batch["old_logp"], ref, batch["advantages"], batch["mask"], cfg)
    return loss, metrics

  def update(state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": _global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return jax.jit(update)


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))
