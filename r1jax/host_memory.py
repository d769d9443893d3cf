"""Host-memory policy for XLA on CPU: keep freed memory in the process for the next step.

Each execution of a compiled XLA CPU program allocates its temporary buffer afresh (through
`posix_memalign`) and frees it at the end: 1.4 GB per train step of the `small` preset at batch
4 x 512. glibc serves such a block with `mmap` from a worker thread's arena and returns it with
`munmap`, so the next step faults in every page again: ~345k faults and ~1 s of kernel time per
step on the 2-core VM (each fault zeroes a 4 KiB page).

`retain_freed_memory()` tells glibc (with `mallopt`, before XLA's worker threads start) to serve
every thread from the main heap (one arena), never to use `mmap` for large blocks, and to trim
the heap only above 2 GiB of free top: the second step reuses the first step's pages with no
faults. The cost is that freed memory stays in the process (the peak is kept, not added to),
and one arena serialises `malloc` between threads: right for CPU training where XLA's temp
buffer dominates, not for a host feeding an accelerator with many data threads, so the
experiments call it only on the CPU backend.

The same policy, without code, for any process: GLIBC_TUNABLES=glibc.malloc.arena_max=1:
glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import platform

import jax

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the largest threshold it can be given
# Installed distributions that give JAX an accelerator backend.
_ACCELERATOR_PLUGINS = ("libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda13-plugin")


@functools.cache
def retain_freed_memory() -> bool:
  """Sets the glibc policy above once per process; False where this is not glibc on Linux.

  Call it before the first JAX computation: threads that already have an arena keep it.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def cpu_backend_expected() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend (which would start
  XLA's threads): JAX_PLATFORMS / jax_platforms names cpu first, or no accelerator plugin is
  installed."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for dist in _ACCELERATOR_PLUGINS:
    try:
      importlib.metadata.version(dist)
      return False
    except importlib.metadata.PackageNotFoundError:
      pass
  return True


def retain_freed_memory_on_cpu() -> bool:
  """`retain_freed_memory()` where JAX will run on the CPU (what the experiments call first)."""
  return cpu_backend_expected() and retain_freed_memory()
