"""Peak host memory of `r1jax.hf.load`, against the model's size and its largest tensor.

    python -m experiments.benchmarks.hf_load_memory --preset=small [--mesh=fsdp=8]

Writes a random checkpoint of the preset in the release layout (bf16 params, as released), then
loads it in a fresh process and reports the growth of that process's resident set during `load`
(peak RSS, reset just before the call, minus the RSS before it). The target is the model's own
params plus about one tensor (or, with a mesh, one leaf's shards): never a second full copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "small", "model preset to write and load")
_MESH = flags.DEFINE_string("mesh", "", "load onto this mesh, e.g. fsdp=8 (8 CPU devices)")
_DIR = flags.DEFINE_string("checkpoint", "", "an existing HF checkpoint dir (skips writing)")
_MEASURE = flags.DEFINE_bool("measure", False, "internal: the child that loads and measures")

_MB = 2**20


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
  # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak excludes the imports.
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _write_checkpoint(preset: str, path: str) -> None:
  import jax
  import jax.numpy as jnp

  from r1jax import hf
  from r1jax.config import ModelConfig
  from r1jax.model import Transformer

  cfg = ModelConfig.from_preset(preset, param_dtype="bfloat16")
  init = jax.jit(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 1), jnp.int32)))
  hf.save(cfg, init(jax.random.key(0)), path)


def _measure(path: str, mesh_text: str) -> dict:
  import jax

  from r1jax import hf, sharding
  from r1jax.safetensors_io import open_checkpoint

  mesh = sharding.make_mesh(**sharding.parse_mesh(mesh_text)) if mesh_text else None
  tensors = open_checkpoint(path)
  largest = max(
    end - begin for shard in set(tensors.values()) for _, _, (begin, end) in shard.tensors.values()
  )
  jax.devices()  # backend start-up is not the loader's memory
  before = _status("VmRSS")
  _reset_peak()
  _, variables = hf.load(path, mesh=mesh)
  peak = _status("VmHWM")
  model = sum(a.nbytes for a in jax.tree.leaves(variables))
  leaf = max(a.nbytes for a in jax.tree.leaves(variables))
  return dict(model=model, largest_tensor=int(largest), largest_leaf=leaf, growth=peak - before)


def main(argv):
  del argv
  if _MEASURE.value:
    print(json.dumps(_measure(_DIR.value, _MESH.value)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = _DIR.value or os.path.join(tmp, "ckpt")
    if not _DIR.value:
      print(f"writing a random {_PRESET.value} checkpoint (bf16) ...", flush=True)
      _write_checkpoint(_PRESET.value, path)
    env = dict(os.environ)
    if _MESH.value:
      env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    cmd = [sys.executable, "-m", __spec__.name, "--measure", f"--checkpoint={path}"]
    cmd += [f"--mesh={_MESH.value}"] if _MESH.value else []
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
  print(f"model params       {r['model'] / _MB:9.1f} MB")
  print(f"largest tensor     {r['largest_tensor'] / _MB:9.1f} MB")
  print(f"largest leaf       {r['largest_leaf'] / _MB:9.1f} MB")
  print(f"load: RSS growth   {r['growth'] / _MB:9.1f} MB")
  over = r["growth"] - r["model"]
  print(
    f"load peak = model + {over / _MB:.1f} MB "
    f"({r['growth'] / r['model']:.2f}x the model; overhead {over / r['largest_tensor']:.1f}x "
    "the largest tensor)"
  )


if __name__ == "__main__":
  app.run(main)
