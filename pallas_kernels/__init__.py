"""Dispatch ops of the MoE layer: router, permute/unpermute, grouped matmul.

Each op takes `impl`: "auto" (pallas on TPU and GPU, xla on CPU), "xla" (pure JAX, the fast CPU
path), "reference" (the readable definition the tests compare against) or "pallas" (Pallas
kernels: Mosaic on TPU, Triton on GPU, interpret mode on CPU; the kernel is chosen when the
function is lowered, so `jax.export(..., platforms=("tpu",))` works from a CPU host).
This package imports only jax and numpy.
"""

from pallas_kernels._impl import IMPLS, resolve_impl
from pallas_kernels.gmm import (
  TUNED_TILING,
  GmmTiling,
  gmm,
  gmm_reference,
  ragged_dot_gmm,
  tgmm,
  tgmm_reference,
)
from pallas_kernels.permute import (
  inverse_permutation,
  permute,
  permute_reference,
  unpermute,
  unpermute_reference,
)
from pallas_kernels.router import route, route_reference, route_with_counts, router_scores

__all__ = [
  "IMPLS",
  "TUNED_TILING",
  "GmmTiling",
  "gmm",
  "gmm_reference",
  "inverse_permutation",
  "permute",
  "permute_reference",
  "ragged_dot_gmm",
  "resolve_impl",
  "route",
  "route_reference",
  "route_with_counts",
  "router_scores",
  "tgmm",
  "tgmm_reference",
  "unpermute",
  "unpermute_reference",
]
