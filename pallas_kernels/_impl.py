"""Resolves the `impl` string every dispatch op takes, and runs Pallas kernels per platform.

"auto" picks the implementation for the current backend; "xla" is the pure-JAX fast path;
"reference" is the readable definition the tests compare against; "pallas" runs the Pallas
kernels: Mosaic on TPU, Triton on GPU (Mosaic GPU, Pallas' default GPU backend in jax 0.10.2,
has no scalar prefetch or vector gather, which these kernels need), and interpret mode on CPU
(slow, for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax

IMPLS = ("auto", "xla", "reference", "pallas")

# Backends where "auto" picks the Pallas kernels. CPU keeps the xla loops: interpret mode is a
# correctness tool, far slower than XLA.
_PALLAS_BACKENDS = ("tpu", "gpu")


def resolve_impl(impl: str, op: str) -> str:
  """Maps an `impl` setting to the implementation that runs.

  Args:
    impl: one of "auto", "xla", "reference", "pallas".
    op: the op's name, for error messages.

  Returns:
    "xla", "reference" or "pallas".

  Raises:
    ValueError: `impl` is not one of the allowed values.
  """
  if impl not in IMPLS:
    raise ValueError(f"{op}: unknown impl={impl!r}; allowed values are {', '.join(IMPLS)}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in _PALLAS_BACKENDS else "xla"
  return impl


def run_kernel(build: Callable[[bool], Callable], *args):
  """Runs `build(interpret)(*args)`, choosing interpret mode by the platform being lowered for.

  The choice is made at lowering time (`lax.platform_dependent`), not from the process's default
  backend: `jax.export(..., platforms=("tpu",))` on a CPU host lowers the compiled kernel (a
  Mosaic custom call), while the same function run on CPU takes the interpret-mode branch.

  Args:
    build: maps `interpret` to a function of `args` that calls `pl.pallas_call`.
    *args: the kernel's operands (arrays).
  """
  return lax.platform_dependent(*args, cpu=build(True), default=build(False))
