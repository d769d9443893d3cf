"""Decode-size matrix products (a few rows against a weight) on XLA:CPU through a C++ kernel.

`small_matmul(spec, x, w, use_kernel, n_in)` is `jnp.einsum(spec, x, w)` where the spec contracts
x's last n_in dims with w's first n_in dims (`bsm,mv->bsv`, `...m,mgf->...gf`, `bshd,hdm->bsm`):
with M = the product of x's other dims <= MAX_ROWS, float32, on CPU, it runs as
x [M, K] @ w [K, N] in `small_matmul.cc`, which streams w once, row-contiguous, over XLA's
intra-op threads. XLA:CPU's dot kernels read a decode step's weights at 5-9 GB/s on the 2-core
VM, the kernel at 11-15 (`small`'s LM head, [4, 512] x [512, 8192]: 1.1 against 1.9 ms).
Elsewhere (training, prefill, other platforms and dtypes) it is the einsum itself, unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from r1jax.cpu_kernels import build

_TARGET = "r1jax_small_matmul"
MAX_ROWS = 8  # rows of x up to which the kernel runs (its accumulators: MAX_ROWS x N floats)


def _kernel(x, w):
  call = jax.ffi.ffi_call(
    _TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32), vmap_method="sequential"
  )
  return call(x, w)


def small_matmul(spec: str, x, w, use_kernel: bool = True, n_in: int = 1):
  """`jnp.einsum(spec, x, w)`, through the C++ kernel for decode sizes on CPU (module docstring).

  Args:
    spec: the einsum; it must contract x's last n_in dims with w's first n_in, in order, and
      keep the rest of both in order (x's first).
    x: [..., *w.shape[:n_in]].
    w: [*in, *out].
    use_kernel: False: the einsum always.
    n_in: how many dims the product contracts.
  """
  reference = lambda x, w: jnp.einsum(spec, x, w)
  rows = math.prod(x.shape[: x.ndim - n_in])
  applies = x.dtype == jnp.float32 and w.dtype == jnp.float32 and 0 < rows <= MAX_ROWS
  if not (use_kernel and applies):
    return reference(x, w)
  if not build.load("small_matmul.cc", "R1jaxSmallMatmul", _TARGET):
    return reference(x, w)
  k = math.prod(w.shape[:n_in])
  out_shape = x.shape[: x.ndim - n_in] + w.shape[n_in:]

  def kernel(x, w):
    return _kernel(x.reshape(rows, k), w.reshape(k, -1)).reshape(out_shape)

  return build.on_cpu(kernel, reference)(x, w)
