"""Shared test setup.

- float32 matmuls at full precision, so that references agree to 1e-5;
- a persistent compilation cache inside the checkout (ignored by git; a fresh clone starts
  cold), so tests that build the same computation compile it once: XLA compiles are most of
  this suite's time on a 2-core CPU. Subprocesses (the experiments' CLI tests) share it;
- 8 simulated CPU devices for the sharding tests (set before jax initialises its backend;
  unsharded computations run on the first device as before);
- XLA:CPU's LLVM backend at optimisation level 0 in the fast suite (see pytest_configure).
"""

import os


def _add_xla_flag(name: str, value: str) -> None:
  """Append --name=value to XLA_FLAGS unless the environment already sets that flag."""
  if name not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{name}={value}").strip()


_add_xla_flag("xla_force_host_platform_device_count", "8")

import jax  # noqa: E402

CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
# The environment too, so that the experiments the tests start as subprocesses share the cache:
# the same tiny run compiled once serves every later process that runs it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  """LLVM at -O0 for the fast suite (the default `-m "not slow"`), before any test initialises
  jax's backend. Its computations are tiny and compiling them is most of its time: the suite
  took 10m01s against 15m05s at XLA's default level (fresh clone, cold cache, 2-core VM). The
  dot kernels are libraries either way; fused loops are compiled without optimisation, which
  moves the last bits of a few results (within every test's tolerance). The slow tests (long
  training runs, `-m slow`) and every benchmark and experiment keep XLA's default."""
  markexpr = config.getoption("markexpr") or ""
  if "slow" not in markexpr or "not slow" in markexpr:
    _add_xla_flag("xla_backend_optimization_level", "0")
