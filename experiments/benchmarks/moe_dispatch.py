"""Grouped-matmul throughput of every dispatch impl, against a dense matmul of the same FLOPs.

  python -m experiments.benchmarks.moe_dispatch                 # shapes and impls by backend
  python -m experiments.benchmarks.moe_dispatch --preset=deepseek --impls=pallas,ragged_dot

The grouped matmul is the MoE layer's expert compute: rows = T*K (token, expert) pairs sorted by
expert, [rows, D] x [E, D, F] -> [rows, F] with the group sizes of a random top-K routing of
random router logits (so groups are uneven, as in training). Useful work = 2 * rows * D * F
FLOPs forward; with --backward, fwd+bwd (dlhs and drhs) = 3x that. The yardstick is a dense
[rows, D] x [D, F] matmul in the same dtype, timed in the same run: "of dense" is the impl's
FLOP/s over the dense matmul's.

Impls: pallas (Mosaic TPU / Triton GPU; interpret mode on CPU, only for a correctness smoke
run), xla (the tiled-loop path, CPU's fast path), ragged_dot (lax.ragged_dot, XLA's grouped
matmul), reference (a masked dense matmul per group: E x the work).

Presets: deepseek = 16384 tokens, D=2048, F=1408, E=64, top-6, bf16 (DeepSeek-V2-Lite's MoE
shapes; the default on GPU/TPU); cpu = 2048 tokens, D=512, F=256, E=64, top-6, float32 (the
default on CPU, where a deepseek-size call takes seconds).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import pallas_kernels as pk

PRESETS = {
  "deepseek": dict(tokens=16384, d_model=2048, d_ff=1408, experts=64, top_k=6, dtype="bfloat16"),
  "cpu": dict(tokens=2048, d_model=512, d_ff=256, experts=64, top_k=6, dtype="float32"),
}
IMPLS = ("pallas", "xla", "ragged_dot", "reference")
_PRESET = flags.DEFINE_enum("preset", "auto", ["auto", *PRESETS], "Shapes; auto: by backend.")
_IMPLS = flags.DEFINE_list("impls", [], f"Subset of {','.join(IMPLS)}; empty: by backend.")
_BACKWARD = flags.DEFINE_bool("backward", False, "Time forward+backward instead of forward.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the inputs.")


def _median_seconds(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _inputs(seed, tokens, d_model, d_ff, experts, top_k, dtype):
  k_logits, k_x, k_w = jax.random.split(jax.random.key(seed), 3)
  logits = jax.random.normal(k_logits, (tokens, experts), jnp.float32)
  _, chosen = jax.lax.top_k(logits, top_k)
  group_sizes = jnp.bincount(chosen.reshape(-1), length=experts).astype(jnp.int32)
  rows = tokens * top_k
  lhs = jax.random.normal(k_x, (rows, d_model), dtype)
  rhs = (jax.random.normal(k_w, (experts, d_model, d_ff), jnp.float32) * d_model**-0.5).astype(
    dtype
  )
  return lhs, rhs, group_sizes


def _op(impl: str):
  if impl == "ragged_dot":
    return pk.ragged_dot_gmm
  if impl == "reference":
    return pk.gmm_reference
  return lambda lhs, rhs, gs: pk.gmm(lhs, rhs, gs, impl=impl)


def _timed(fn, backward: bool):
  if not backward:
    return jax.jit(fn)

  def loss(lhs, rhs, gs):
    return jnp.sum(fn(lhs, rhs, gs).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv):
  del argv
  backend = jax.default_backend()
  preset = _PRESET.value if _PRESET.value != "auto" else ("cpu" if backend == "cpu" else "deepseek")
  shape = PRESETS[preset]
  impls = _IMPLS.value or (["xla", "ragged_dot", "reference"] if backend == "cpu" else list(IMPLS))
  unknown = set(impls) - set(IMPLS)
  if unknown:
    raise app.UsageError(f"--impls: unknown {sorted(unknown)}; choose from {','.join(IMPLS)}")
  lhs, rhs, gs = _inputs(_SEED.value, **shape)
  rows, d, f = lhs.shape[0], shape["d_model"], shape["d_ff"]
  flops = 2 * rows * d * f * (3 if _BACKWARD.value else 1)
  device = jax.devices()[0]
  print(f"backend {backend} ({device.device_kind}), preset {preset}: {shape}")
  print(f"group sizes: min {int(gs.min())}, max {int(gs.max())}, rows {rows}")
  dense_w = rhs[0]
  dense = _timed(lambda a, b, _: a @ b, _BACKWARD.value)
  dense_s = _median_seconds(dense, (lhs, dense_w, gs), _REPS.value)
  dense_rate = flops / dense_s
  mode = "fwd+bwd" if _BACKWARD.value else "fwd"
  print(f"{'dense matmul':<12} {mode} {dense_s * 1e3:9.2f} ms {dense_rate / 1e12:8.3f} TFLOP/s")
  rates = {}
  for impl in impls:
    seconds = _median_seconds(_timed(_op(impl), _BACKWARD.value), (lhs, rhs, gs), _REPS.value)
    rates[impl] = flops / seconds
    print(
      f"{impl:<12} {mode} {seconds * 1e3:9.2f} ms {rates[impl] / 1e12:8.3f} TFLOP/s "
      f"({rates[impl] / dense_rate:6.1%} of dense)"
    )
  best = "pallas" if "pallas" in rates else "xla" if "xla" in rates else None
  if best and "ragged_dot" in rates:
    print(f"{best} / ragged_dot: {rates[best] / rates['ragged_dot']:.1f}x")


if __name__ == "__main__":
  app.run(main)
