"""Routed SwiGLU experts at decode sizes (a few tokens), on XLA:CPU through a C++ kernel.

Dims as r1jax.layers.experts: T tokens, D model, F expert ffn, E experts, K per token.
out[t] = sum_k weights[t, k] * (silu(x[t] @ wi[e][:, :F]) * (x[t] @ wi[e][:, F:])) @ wo[e],
e = experts[t, k]; ids >= E add nothing.

`routed_experts.cc` groups the pairs by expert and streams each used expert's weights once,
for all of its tokens, on XLA's intra-op threads; XLA's loop over pairs
(`r1jax.layers.experts._pairwise_experts`, the reference here) copies each pair's expert
weights out of the stack first. On `small` at 4 tokens (2-core VM): see
experiments/benchmarks/decode.py. The sum over k runs in order whatever thread ran which
expert, so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from r1jax.cpu_kernels import build

_TARGET = "r1jax_routed_experts"


def kernel_applies(x, weights, experts, wi, wo) -> bool:
  """float32 tokens, weights and experts' weights, int32 ids."""
  f32 = all(a.dtype == jnp.float32 for a in (x, weights, wi, wo))
  return f32 and experts.dtype == jnp.int32


def _kernel(x, weights, experts, wi, wo):
  call = jax.ffi.ffi_call(
    _TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential"
  )
  return call(x, weights, experts, wi, wo)


def routed_experts_decode(x, weights, experts, wi, wo, reference: Callable) -> jax.Array:
  """`reference(x, weights, experts, wi, wo)`'s result (x [T, D], weights and experts [T, K],
  wi [E, D, 2F], wo [E, F, D]); through the C++ kernel when lowering for CPU, `kernel_applies`
  and the kernel built here (`build.load`)."""
  args = (x, weights, experts, wi, wo)
  if not kernel_applies(*args):
    return reference(*args)
  if not build.load("routed_experts.cc", "R1jaxRoutedExperts", _TARGET):
    return reference(*args)
  return build.on_cpu(_kernel, reference)(*args)
