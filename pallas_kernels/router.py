"""Router: expert scores, group-limited top-k selection, routing weights (DeepSeek-V2/V3 gates).

Dims: T tokens, E experts, K top-k (experts per token), G expert groups; Tb tokens per kernel
block; Ep, Kp: E and K rounded up to powers of two (the padded lane widths of the kernel).

Math, per token (all in float32):
  s      = sigmoid(logits) (V3) or softmax(logits) (V2)                         [T, E]
  s_sel  = s + bias (bias only chooses experts, it never enters the weights)    [T, E]
  if G > 1: group score = sum of the top-2 of s_sel in the group (V3, "top2sum")
            or its max (V2, "max"); the experts of all but the `topk_group` best groups
            are set to -inf in s_sel
  experts = top_k(s_sel) indices (ties go to the lower index, as lax.top_k)    [T, K]
  weights = s at experts; / (sum + 1e-20) if norm_topk_prob; * routed_scaling_factor.
  counts[e] = #{(t, k) : experts[t, k] == e}                                   [E]

impl="xla" and "reference" share `route_reference`: a handful of fused elementwise ops and two
small top-k's, nothing a pure-JAX rewrite would speed up.

impl="pallas" is one fused gate kernel over blocks of Tb tokens: scores, bias, group scores and
group mask, then K rounds of "argmax with the lowest index, then mask it" (exactly lax.top_k's
order and tie rule), the gather of the unbiased weights, normalisation, scaling, and per-block
expert counts [Ep] that the wrapper sums. Every reduction is a float32 max/min/sum over one
axis (Mosaic TPU reduces floats only; indices < 2^24 are exact in float32). The wrapper pads
logits to [T rounded up to Tb, Ep] (padded columns are -inf, so softmax ignores them, and are
masked from selection), because Triton tensors must have power-of-two shapes and the Triton
backend does not mask partial blocks; the padding copies a [T, E] float32 array, small next to
the [T, m] @ [m, E] gate matmul that made it. The selection has no gradient; the weights get one
through a custom VJP that recomputes s at the chosen experts in plain jnp (`_weights_at`, the
reference math) and differentiates that.

Backends, chosen when lowering (lax.platform_dependent), not from the default backend:
  tpu: Mosaic TPU; the logits block [Tb, Ep] and outputs [Tb, Kp] span the full lane dims.
  cuda/rocm: Triton (`pallas.triton.CompilerParams`). jax 0.10.2's default GPU backend, Mosaic
    GPU, is deprecated for pl.pallas_call and has no lowering for these row-wise reductions
    and selects on arbitrary [Tb, Ep] tiles; Triton does. Triton kernels carry the custom call
    `__gpu$xla.gpu.triton`, which jax.export serialises only with that safety check disabled.
  cpu: interpret mode of the same kernel body (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._impl import resolve_impl

SCORE_FUNCS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2sum", "max")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Token block of the gate kernel.

  Attributes:
    tokens: Tb, tokens per grid step. A power of two (Triton tensor shapes) and a multiple of
      8 (TPU sublanes: the logits block [Tb, Ep] is float32). The lane dims Ep and Kp span
      the full (padded) arrays, which TPU allows at any width.
  """

  tokens: int = 128

  def __post_init__(self):
    tb = self.tokens
    if not isinstance(tb, int) or tb < 8 or tb & (tb - 1):
      raise ValueError(f"BlockSizes.tokens must be a power of two >= 8, got {tb!r}")


# Per lowering platform. Not measured yet (no TPU/GPU here): TPU takes big blocks (per-step
# overhead ~0.35 us); Triton keeps [Tb, Ep] tiles small enough for registers.
TUNED_BLOCK_SIZES = types.MappingProxyType(
  {"tpu": BlockSizes(tokens=256), "gpu": BlockSizes(tokens=32), "cpu": BlockSizes(tokens=128)}
)


@dataclasses.dataclass(frozen=True)
class _Gate:
  """The static gate settings (hashable: a custom_vjp nondiff argument and kernel parameter)."""

  num_experts: int
  top_k: int
  score_func: str
  n_group: int
  topk_group: int
  group_score: str
  norm_topk_prob: bool
  routed_scaling_factor: float


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------- kernel body


def _first_max(x, colf, width):
  """Per row: the max of x [Tb, W] and the lowest column holding it ([Tb, 1] each, float32)."""
  best = jnp.max(x, axis=1, keepdims=True)
  return best, jnp.min(jnp.where(x == best, colf, float(width)), axis=1, keepdims=True)


def _keep_best_groups(sel, col, colf, gate: _Gate):
  """Sets the experts outside each row's `topk_group` best groups to -inf. [Tb, Ep] -> same.

  Groups are static column ranges (no reshape: Mosaic and Triton relayouts are costly). A
  group's rank counts the groups that beat it, ties going to the lower group index, which is
  lax.top_k's order; the `topk_group` lowest ranks are kept.
  """
  width = sel.shape[1]
  size = gate.num_experts // gate.n_group
  members, scores = [], []
  for g in range(gate.n_group):
    member = (col >= g * size) & (col < (g + 1) * size)
    vals = jnp.where(member, sel, -jnp.inf)
    top, first = _first_max(vals, colf, width)
    if gate.group_score == "top2sum":
      top = top + jnp.max(jnp.where(colf == first, -jnp.inf, vals), axis=1, keepdims=True)
    members.append(member)
    scores.append(top)
  keep = jnp.zeros(sel.shape, jnp.bool_)
  for g, score in enumerate(scores):
    beaten_by = [(other > score) | ((other == score) & (h < g)) for h, other in enumerate(scores)]
    rank = sum(jnp.where(b, 1.0, 0.0) for b in beaten_by)  # [Tb, 1]
    keep = keep | (members[g] & (rank < gate.topk_group))
  return jnp.where(keep, sel, -jnp.inf)


def _gate_kernel(logits_ref, bias_ref, w_ref, e_ref, counts_ref, *, gate: _Gate, num_tokens):
  """One block of Tb tokens: logits [Tb, Ep], bias [1, Ep] -> weights, experts [Tb, Kp] and
  this block's expert counts [1, Ep] (padded rows >= T are not counted)."""
  z = logits_ref[...]
  tb, ep = z.shape
  col = lax.broadcasted_iota(jnp.int32, (tb, ep), 1)
  colf = col.astype(jnp.float32)
  if gate.score_func == "sigmoid":
    s = lax.logistic(z)
  else:
    u = jnp.exp(z - jnp.max(z, axis=1, keepdims=True))  # padded columns: exp(-inf) = 0
    s = u / jnp.sum(u, axis=1, keepdims=True)
  sel = jnp.where(col < gate.num_experts, s + bias_ref[...], -jnp.inf)
  if gate.n_group > 1:
    sel = _keep_best_groups(sel, col, colf, gate)

  kp = w_ref.shape[1]
  slot = lax.broadcasted_iota(jnp.int32, (tb, kp), 1)
  weights = jnp.zeros((tb, kp), jnp.float32)
  experts = jnp.zeros((tb, kp), jnp.int32)
  picked = jnp.zeros((tb, ep), jnp.bool_)
  for j in range(gate.top_k):
    _, idx = _first_max(sel, colf, ep)
    hit = colf == idx
    w_j = jnp.sum(jnp.where(hit, s, 0.0), axis=1, keepdims=True)
    weights = jnp.where(slot == j, w_j, weights)
    experts = jnp.where(slot == j, idx.astype(jnp.int32), experts)
    picked = picked | hit
    sel = jnp.where(hit, -jnp.inf, sel)
  if gate.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
  w_ref[...] = weights * gate.routed_scaling_factor
  e_ref[...] = experts
  row = pl.program_id(0) * tb + lax.broadcasted_iota(jnp.int32, (tb, ep), 0)
  counts_ref[...] = jnp.sum(jnp.where(picked & (row < num_tokens), 1.0, 0.0), axis=0, keepdims=True)


# ----------------------------------------------------------------------------- pallas_call


def _compiler_params(backend: str):
  if backend == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",))
  return pltriton.CompilerParams(num_warps=4, num_stages=1)


def gate_call(
  logits: jax.Array,
  bias: jax.Array,
  gate: _Gate,
  *,
  block_sizes: BlockSizes,
  interpret: bool,
  backend: str = "tpu",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gate kernel on one platform (no VJP; `route` wires the gradient).

  Args:
    logits: [T, E] router logits (any float dtype; the kernel works in float32).
    bias: [E] float32 selection bias (zeros for none).
    gate: the static gate settings.
    block_sizes: the token block.
    interpret: run the kernel body in interpret mode (CPU).
    backend: "tpu" (Mosaic) or "gpu" (Triton) compiler parameters; the body is the same.

  Returns:
    weights [T, K] float32, experts [T, K] int32, counts [E] int32.
  """
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"backend={backend!r}; allowed: tpu, gpu")
  t, e = logits.shape
  tb, ep, kp = block_sizes.tokens, _pow2(e), _pow2(gate.top_k)
  tp = pl.cdiv(t, tb) * tb
  z = jnp.pad(logits.astype(jnp.float32), ((0, tp - t), (0, 0)))
  z = jnp.pad(z, ((0, 0), (0, ep - e)), constant_values=-jnp.inf)
  b = jnp.pad(bias.astype(jnp.float32), (0, ep - e))[None, :]
  nb = tp // tb
  weights, experts, counts = pl.pallas_call(
    functools.partial(_gate_kernel, gate=gate, num_tokens=t),
    out_shape=(
      jax.ShapeDtypeStruct((tp, kp), jnp.float32),
      jax.ShapeDtypeStruct((tp, kp), jnp.int32),
      jax.ShapeDtypeStruct((nb, 1, ep), jnp.float32),
    ),
    grid=(nb,),
    in_specs=[pl.BlockSpec((tb, ep), lambda i: (i, 0)), pl.BlockSpec((1, ep), lambda i: (0, 0))],
    out_specs=(
      pl.BlockSpec((tb, kp), lambda i: (i, 0)),
      pl.BlockSpec((tb, kp), lambda i: (i, 0)),
      pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0)),
    ),
    interpret=interpret,
    compiler_params=None if interpret else _compiler_params(backend),
    name="moe_gate",
  )(z, b)
  k = gate.top_k
  return weights[:t, :k], experts[:t, :k], jnp.sum(counts[:, 0, :e], axis=0).astype(jnp.int32)


def _run_gate(logits, bias, gate: _Gate, block_sizes: BlockSizes | None):
  """The gate kernel for the platform being lowered for: interpret on CPU, Mosaic on TPU,
  Triton on GPU."""

  def build(platform):
    sizes = block_sizes or TUNED_BLOCK_SIZES[platform]
    interpret = platform == "cpu"
    backend = "gpu" if platform == "gpu" else "tpu"
    return functools.partial(
      gate_call, gate=gate, block_sizes=sizes, interpret=interpret, backend=backend
    )

  return lax.platform_dependent(
    logits, bias, cpu=build("cpu"), tpu=build("tpu"), default=build("gpu")
  )


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _route_pallas(gate, block_sizes, logits, bias):
  return _run_gate(logits, bias, gate, block_sizes)


def _route_pallas_fwd(gate, block_sizes, logits, bias):
  out = _run_gate(logits, bias, gate, block_sizes)
  return out, (logits, out[1], bias)


def _route_pallas_bwd(gate, block_sizes, res, cotangents):
  del block_sizes
  logits, experts, bias = res
  _, vjp = jax.vjp(
    lambda z: _weights_at(
      z, experts, gate.score_func, gate.norm_topk_prob, gate.routed_scaling_factor
    ),
    logits,
  )
  # The bias only moves the (discrete) selection: no gradient, as in the reference.
  return vjp(cotangents[0])[0], jnp.zeros_like(bias)


_route_pallas.defvjp(_route_pallas_fwd, _route_pallas_bwd)


# ----------------------------------------------------------------------------- public ops


def _check_route_args(logits, bias, top_k, score_func, n_group, topk_group, group_score):
  t_e = logits.shape
  if len(t_e) != 2:
    raise ValueError(f"route: logits must be [T, E], got shape {t_e}")
  e = t_e[1]
  if score_func not in SCORE_FUNCS:
    raise ValueError(f"score_func={score_func!r}; allowed values are {', '.join(SCORE_FUNCS)}")
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


def route_with_counts(
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
  block_sizes: BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`route`, plus how many (token, slot) pairs chose each expert (the balancing statistics).

  Arguments as in `route`.

  Returns:
    weights [T, K] float32, experts [T, K] int32 (best first), counts [E] int32 with
    counts[e] = #{(t, k) : experts[t, k] == e}; the pallas impl counts inside the gate kernel.
  """
  impl = resolve_impl(impl, "route")
  logits = jnp.asarray(logits)
  _check_route_args(logits, bias, top_k, score_func, n_group, topk_group, group_score)
  e = logits.shape[1]
  if impl == "pallas":
    gate = _Gate(
      e,
      top_k,
      score_func,
      n_group,
      topk_group,
      group_score,
      bool(norm_topk_prob),
      float(routed_scaling_factor),
    )
    bias = jnp.zeros((e,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    return _route_pallas(gate, block_sizes, logits, bias)
  weights, experts = route_reference(
    logits,
    bias,
    top_k=top_k,
    score_func=score_func,
    n_group=n_group,
    topk_group=topk_group,
    group_score=group_score,
    norm_topk_prob=norm_topk_prob,
    routed_scaling_factor=routed_scaling_factor,
  )
  counts = jnp.zeros((e,), jnp.int32).at[experts.reshape(-1)].add(1)
  return weights, experts, counts


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
  block_sizes: BlockSizes | None = None,
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
    block_sizes: the pallas impl's token block; None takes TUNED_BLOCK_SIZES per platform.

  Returns:
    weights [T, K] float32 (unbiased scores) and experts [T, K] int32, best first.
  """
  weights, experts, _ = route_with_counts(
    logits,
    bias,
    top_k=top_k,
    score_func=score_func,
    n_group=n_group,
    topk_group=topk_group,
    group_score=group_score,
    norm_topk_prob=norm_topk_prob,
    routed_scaling_factor=routed_scaling_factor,
    impl=impl,
    block_sizes=block_sizes,
  )
  return weights, experts


# ----------------------------------------------------------------------------- reference


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


def _weights_at(logits, experts, score_func: str, norm_topk_prob: bool, scale: float):
  """weights [T, K] = s at `experts`, renormalised and scaled: the differentiable half."""
  weights = jnp.take_along_axis(router_scores(logits, score_func), experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * scale


def route_reference(
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
) -> tuple[jax.Array, jax.Array]:
  """The gate in plain jnp (the xla and reference impls). Arguments and result as in `route`."""
  logits = jnp.asarray(logits)
  _check_route_args(logits, bias, top_k, score_func, n_group, topk_group, group_score)
  s = router_scores(logits, score_func)
  s_sel = s if bias is None else s + jnp.asarray(bias).astype(jnp.float32)[None, :]
  if n_group > 1:
    s_sel = _group_limited(s_sel, n_group, topk_group, group_score)
  # The selection is discrete: no gradient flows through it, only through s at the choice.
  _, experts = lax.top_k(lax.stop_gradient(s_sel), top_k)
  weights = _weights_at(logits, experts, score_func, norm_topk_prob, routed_scaling_factor)
  return weights, experts.astype(jnp.int32)
