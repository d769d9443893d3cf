"""Dispatch ops of the MoE layer: router, permute/unpermute, grouped matmul.

Each op takes `impl`: "auto" (by backend), "xla" (pure JAX, the fast CPU path), "reference"
(the readable definition the tests compare against) or "pallas" (reserved, not written yet).
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
from pallas_kernels.permute import inverse_permutation, permute, unpermute
from pallas_kernels.router import route, router_scores

__all__ = [
  "IMPLS",
  "TUNED_TILING",
  "GmmTiling",
  "gmm",
  "gmm_reference",
  "inverse_permutation",
  "permute",
  "ragged_dot_gmm",
  "resolve_impl",
  "route",
  "router_scores",
  "tgmm",
  "tgmm_reference",
  "unpermute",
]
