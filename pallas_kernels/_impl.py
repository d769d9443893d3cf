"""Resolves the `impl` string every dispatch op takes.

"auto" picks the implementation for the current backend; "xla" is the pure-JAX fast path;
"reference" is the readable definition the tests compare against; "pallas" (TPU Mosaic / GPU
Triton kernels) is reserved for a later issue.
"""

from __future__ import annotations

import jax

IMPLS = ("auto", "xla", "reference", "pallas")


def resolve_impl(impl: str, op: str) -> str:
  """Maps an `impl` setting to the implementation that runs.

  Args:
    impl: one of "auto", "xla", "reference", "pallas".
    op: the op's name, for error messages.

  Returns:
    "xla" or "reference".

  Raises:
    ValueError: `impl` is not one of the allowed values.
    NotImplementedError: `impl` is "pallas" (not written yet).
  """
  if impl not in IMPLS:
    raise ValueError(f"{op}: unknown impl={impl!r}; allowed values are {', '.join(IMPLS)}")
  if impl == "pallas":
    raise NotImplementedError(
      f"{op}: impl='pallas' is not implemented yet (backend {jax.default_backend()!r}); "
      "use impl='xla' or impl='auto'"
    )
  if impl == "auto":
    # The pure-JAX path is the fastest one written so far on every backend; Pallas kernels
    # will take over TPU/GPU here once they exist.
    return "xla"
  return impl
