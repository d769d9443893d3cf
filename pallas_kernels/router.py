"""Router: expert scores, group-limited top-k selection, routing weights (DeepSeek-V2/V3 gates).

Dims: T tokens, E experts, K top-k (experts per token), G expert groups.

Math, per token (all in float32):
  s      = sigmoid(logits) (V3) or softmax(logits) (V2)                         [T, E]
  s_sel  = s + bias (bias only chooses experts, it never enters the weights)    [T, E]
  if G > 1: group score = sum of the top-2 of s_sel in the group (V3, "top2sum")
            or its max (V2, "max"); the experts of all but the `topk_group` best groups
            are set to -inf in s_sel
  experts = top_k(s_sel) indices (ties go to the lower index, as lax.top_k)    [T, K]
  weights = s at experts; / (sum + 1e-20) if norm_topk_prob; * routed_scaling_factor.

The xla and reference impls share one definition: it is a handful of fused elementwise ops and
two small top-k's, nothing a pure-JAX rewrite would speed up. A fused Pallas gate (scores,
group mask and top-k in one pass over [T, E]) is the planned "pallas" impl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._impl import resolve_impl

SCORE_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2sum", "max")


def router_scores(logits: jax.Array, score_func: str) -> jax.Array:
  """Expert scores s from router logits.

  Args:
    logits: [T, E] router logits (computed in float32 by the caller).
    score_func: "sigmoid" (V3) or "softmax" (V2).

  Returns:
    [T, E] float32 scores.
  """
  if score_func not in SCORE_FUNCS:
    raise ValueError(f"score_func={score_func!r}; allowed values are {', '.join(SCORE_FUNCS)}")
  logits = logits.astype(jnp.float32)
  if score_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def _group_limited(s_sel: jax.Array, n_group: int, topk_group: int, group_score: str):
  """Sets the experts outside the `topk_group` best groups to -inf. [T, E] -> [T, E]."""
  t, e = s_sel.shape
  grouped = s_sel.reshape(t, n_group, e // n_group)
  if group_score == "top2sum":
    scores = jnp.sum(lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
  else:
    scores = jnp.max(grouped, axis=-1)
  _, keep = lax.top_k(scores, topk_group)  # [T, topk_group]
  kept = jnp.any(keep[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)  # [T, G]
  masked = jnp.where(kept[:, :, None], grouped, -jnp.inf)
  return masked.reshape(t, e)


def _check_route_args(logits, bias, top_k, n_group, topk_group, group_score):
  t_e = logits.shape
  if len(t_e) != 2:
    raise ValueError(f"route: logits must be [T, E], got shape {t_e}")
  e = t_e[1]
  if bias is not None and bias.shape != (e,):
    raise ValueError(f"route: bias must be [E]=[{e}], got shape {bias.shape}")
  if not 1 <= top_k <= e:
    raise ValueError(f"route: top_k={top_k} must be in [1, E={e}]")
  if n_group < 1 or e % n_group:
    raise ValueError(f"route: n_group={n_group} must divide E={e}")
  if not 1 <= topk_group <= n_group:
    raise ValueError(f"route: topk_group={topk_group} must be in [1, n_group={n_group}]")
  if group_score not in GROUP_SCORES:
    raise ValueError(f"route: group_score={group_score!r}; allowed: {', '.join(GROUP_SCORES)}")
  if n_group > 1 and group_score == "top2sum" and e // n_group < 2:
    raise ValueError(f"route: group_score='top2sum' needs >= 2 experts per group, E={e}")
  if n_group > 1 and topk_group * (e // n_group) < top_k:
    raise ValueError(
      f"route: topk_group={topk_group} groups of {e // n_group} experts hold fewer than "
      f"top_k={top_k}; raise topk_group"
    )


def route(
  logits: jax.Array,
  bias: jax.Array | None,
  *,
  top_k: int,
  score_func: str = "sigmoid",
  n_group: int = 1,
  topk_group: int = 1,
  group_score: str = "top2sum",
  norm_topk_prob: bool = True,
  routed_scaling_factor: float = 1.0,
  impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Chooses K experts per token and their weights (module docstring has the math).

  Args:
    logits: [T, E] router logits.
    bias: [E] float32 selection bias (V3's aux-loss-free correction bias) or None.
    top_k: K, experts per token.
    score_func: "sigmoid" (V3) or "softmax" (V2).
    n_group: G, expert groups for group-limited routing (1: no group limit).
    topk_group: groups each token may route to.
    group_score: "top2sum" (V3) or "max" (V2) group score.
    norm_topk_prob: renormalise the K weights to sum to one (before scaling).
    routed_scaling_factor: multiplies the weights after normalisation.
    impl: "auto" | "xla" | "reference" | "pallas".

  Returns:
    weights [T, K] float32 (unbiased scores) and experts [T, K] int32, best first.
  """
  resolve_impl(impl, "route")
  _check_route_args(logits, bias, top_k, n_group, topk_group, group_score)
  s = router_scores(logits, score_func)
  s_sel = s if bias is None else s + bias.astype(jnp.float32)[None, :]
  if n_group > 1:
    s_sel = _group_limited(s_sel, n_group, topk_group, group_score)
  # The selection is discrete: no gradient flows through it, only through s at the choice.
  _, experts = lax.top_k(lax.stop_gradient(s_sel), top_k)
  weights = jnp.take_along_axis(s, experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  weights = weights * routed_scaling_factor
  return weights, experts.astype(jnp.int32)
