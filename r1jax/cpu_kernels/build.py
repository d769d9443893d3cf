"""Builds r1jax's C++ kernels for XLA:CPU and registers them as XLA FFI targets, once per machine.

Each kernel is one C++ source beside this file defining an XLA FFI handler symbol (with the
headers beside it, what they share: parallel.h the work loop, vec8.h the vector type,
stream_rows.h the weight-streaming product). On first use it is compiled with the
system's C++ compiler ($CXX, else `c++`) against the FFI headers jaxlib ships
(`jax.ffi.include_dir()`), with -O3 -march=native, into a cache directory ($R1JAX_KERNEL_CACHE,
else ~/.cache/r1jax/kernels). The library's name is a hash of the source and the headers, the
command, jaxlib's version and the CPU's model and flags: -march=native code runs only on the
kind of CPU it was built on, and a shared home directory may serve several kinds. Concurrent
builds (pytest workers) write temporary files and rename them into place.

No compiler, or a failed build: `load` logs one warning and returns False, and the ops that use
the kernel run their XLA implementation instead (the same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable

import jax
import jaxlib
from jax import lax

_SOURCES = pathlib.Path(__file__).parent
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_BUILD_TIMEOUT_S = 300


def cache_dir() -> pathlib.Path:
  """Where built kernels are kept: $R1JAX_KERNEL_CACHE, else ~/.cache/r1jax/kernels."""
  env = os.environ.get("R1JAX_KERNEL_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "r1jax" / "kernels"


def _cpu_identity() -> str:
  """The CPU's model name and feature flags (what -march=native compiles for)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.machine() + platform.processor()
  keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags")]
  return "\n".join(sorted(set(keep))) or platform.machine()


def _library_path(source: pathlib.Path, command: list[str]) -> pathlib.Path:
  key = hashlib.sha256()
  headers = [h.read_bytes() for h in sorted(_SOURCES.glob("*.h"))]  # what the sources include
  for part in (source.read_bytes(), *headers, " ".join(command).encode()):
    key.update(part)
  key.update(jaxlib.__version__.encode())
  key.update(_cpu_identity().encode())
  return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(source: pathlib.Path) -> pathlib.Path:
  """Compiles `source` unless its library is cached; returns the library's path.

  Raises:
    RuntimeError: no C++ compiler, or the compiler failed (its output in the message).
  """
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}"]
  library = _library_path(source, command)
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
    built = pathlib.Path(tmp) / library.name
    result = subprocess.run(
      [*command, str(source), "-o", str(built)],
      capture_output=True,
      text=True,
      timeout=_BUILD_TIMEOUT_S,
    )
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} {source.name} failed:\n{result.stderr[-2000:]}")
    os.replace(built, library)  # atomic: a concurrent build of the same source writes the same
  return library


@functools.cache
def load(source_name: str, symbol: str, target: str) -> bool:
  """Builds `source_name` (a .cc beside this module) if needed, loads it and registers its FFI
  handler `symbol` as the CPU target `target`. True when the target is ready, False (after a
  warning naming the cause) when it cannot be built here."""
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(_SOURCES / source_name)))
    handler = getattr(library, symbol)
  except (OSError, AttributeError, RuntimeError, subprocess.TimeoutExpired) as error:
    logging.warning(
      "r1jax CPU kernel %s unavailable, using its XLA implementation: %s", source_name, error
    )
    return False
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  return True


def on_cpu(kernel: Callable, reference: Callable) -> Callable:
  """`kernel` when lowering for CPU, `reference` elsewhere (decided per lowering platform, so
  `jax.export(..., platforms=("tpu",))` on a CPU host lowers no CPU custom call); gradients are
  the reference's, recomputed (the kernels have no backward of their own)."""

  def either(*args):
    return lax.platform_dependent(*args, cpu=kernel, default=reference)

  op = jax.custom_vjp(either)
  op.defvjp(lambda *args: (either(*args), args), lambda args, g: jax.vjp(reference, *args)[1](g))
  return op
