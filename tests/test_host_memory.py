"""r1jax.host_memory: with the policy set, repeated XLA executions stop faulting in fresh pages."""

import json
import subprocess
import sys

import pytest

from r1jax import host_memory
from tests.cli import ROOT

# A child that runs a jitted program with a 256 MiB temporary (a matmul's result, consumed by a
# second matmul) eight times and prints the minor page faults of the last three runs: the faults,
# not time, are what host_memory changes. Eight: the temporary is allocated by whichever pool
# thread runs the program, and each thread's malloc arena faults its own first copy in (seen
# under load: the 3rd and 4th of five runs still faulted, the 5th did not).
_CHILD = """
import json, resource, sys, time
from r1jax import host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else False
import jax, jax.numpy as jnp
program = jax.jit(lambda x, w: jnp.tanh(x @ w).T @ x)  # temp tanh(x @ w): [65536, 1024] f32
x, w = jnp.ones((65536, 64), jnp.float32), jnp.ones((64, 1024), jnp.float32)
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(x, w).block_until_ready()
  time.sleep(0.2)  # the temporary is freed just after the result is ready, by another thread
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"retained": retained, "faults": faults[-3:]}))
"""
_PAGES = 256 * 2**20 // 4096


def _faults(mode: str) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _CHILD, mode],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    check=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_is_reused_without_page_faults():
  default, retained = _faults("default"), _faults("retain")
  if not retained["retained"]:
    pytest.skip("not glibc on Linux: mallopt is unavailable")
  # glibc's default: every execution maps its 256 MiB afresh and faults in each page.
  assert min(default["faults"]) > 0.9 * _PAGES, default
  # Retained: the pages of the first runs are reused.
  assert max(retained["faults"]) < 0.02 * _PAGES, retained


def test_cpu_backend_expected_follows_jax_platforms():
  import jax

  before = jax.config.jax_platforms
  try:
    jax.config.update("jax_platforms", "cpu")
    assert host_memory.cpu_backend_expected()
    jax.config.update("jax_platforms", "tpu,cpu")
    assert not host_memory.cpu_backend_expected()
  finally:
    jax.config.update("jax_platforms", before)
