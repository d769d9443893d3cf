"""Decode throughput of MLA's two caches: absorbed (the latent) against naive (per-head K and V).

  python -m experiments.benchmarks.decode
  python -m experiments.benchmarks.decode --contexts=512,1024,4096 --batch=4

Model: the `small` preset (~90M params: 4 layers, hidden 512, 8 heads; MLA with c=128, r=32,
d=64, d_v=64) in float32 with multi-token prediction off (decoding never runs it) and layers
unrolled (ModelConfig.scan_layers=False; --scan_layers restores the scan: see below). The two
forms differ only in `ModelConfig.decode_cache`; the weights are the same.

  absorbed  cache latent [b, T, c] + rope_key [b, T, r]: (128 + 32) x 4 B = 640 B per token and
            layer. Per step: q folded through W^UK (`bshd,chd->bshc`), scores `bshc,btc->bsht` +
            `bshr,btr->bsht`, values `bsht,btc->bshc`, then W^UV (`bshc,chd->bshd`) and wo.
  naive     cache key [b, h, T, d+r] + value [b, h, T, d_v]: 8 x (96 + 64) x 4 B = 5120 B per
            token and layer (8x). Per step: the new token's K and V expanded once from its
            latent, scores `bshd,bhtd->bsht`, values `bsht,bhtd->bshd`.

Per context length in --contexts: both forms' caches are filled by a prefill of `context`
random tokens through the decode path (--prefill_chunk tokens per call), then every timed step
feeds one more token at slot context - 1 (its position), attending over exactly `context`
keys: the step sets the write index back to context - 1 first, so the cache is exactly
`context` slots long and never outgrows max_position_embeddings (4096 for `small`). One step =
one jitted forward of the decoder for [batch, 1] tokens (MoE, head and all) with the cache
donated, so its one-slot update is in place, as in `r1jax.generate.Generator`'s loop. The
first step's logits of the two forms are compared (same model, same context: they must agree).

Timed steps alternate between the forms (both see the same background load; the machine is
shared); the median is reported, tokens/s = batch / median. Cache bytes are measured from the
cache arrays (the form's two arrays; index and valid are bookkeeping, b x T bools per layer)
and printed beside `r1jax.sizing.kv_cache_bytes_per_token(cfg, form) * batch * context`.
The last line is `absorbed/naive tokens/s at 4096: X.XX` (at the longest context measured).

Batch (default 4): a decode step reads the weights once whatever the batch (~3 MB of attention
weights per layer, the dense layer's 8.6 MB MLP, the 16 MB head, ~1.5 MB per expert routed to)
but every row's cache: at 4096 tokens, 40 MiB (absorbed) and 320 MiB (naive) at batch 4
against 10 and 80 MiB at batch 1, so batch 4 is where the cache, the thing the forms differ
in, is most of what a step streams. At batch 4 XLA:CPU also compiles the step without extra
cache copies (checked in the optimized HLO); at batch 1 it turns the attention dots into
unbatched ones with a transposed operand and copies each layer's cache several times a step
(both forms), which inflates the naive side 8x more (see batch 1 below). Larger batches route
to more experts, whose weights every step reads.

Layers unrolled: a scanned stack (nn.scan over the "cache" collection) slices each layer's
cache out of the stack and stacks the updated one back every step, copying the whole cache
(both forms), 3.8x slower for the absorbed form below. `Generator` decodes with the config's
scan_layers (True by default), so its steps pay this.

C++ kernels (ModelConfig.cpu_kernels, on by default; --nocpu_kernels runs XLA's ops only): on
XLA:CPU a decode step runs three kernels of r1jax/cpu_kernels, XLA FFI handlers compiled on
first use: the absorbed attention (latent_attention.cc: the W^UK fold, scores, masked online
softmax and values in one pass over each block of keys for all heads, the W^UV fold; rows and
key chunks over XLA's intra-op threads), the routed experts at decode sizes
(routed_experts.cc: each used expert's weights streamed once) and every decode-size weight
product (small_matmul.cc: projections, MLPs, LM head). The naive form uses the last two as
well, so the comparison stays one of caches.

Measured on 2026-12-07 on the 2-core CPU VM (jax 0.10.2), defaults (kernels on), a run near
the median of that afternoon's:
  context  512: absorbed  6.60 ms/step 605.6 tokens/s, cache  5.00 MiB (= predicted 5242880 B)
                naive     8.51 ms/step 469.9 tokens/s, cache 40.00 MiB (= predicted 41943040 B)
  context 4096: absorbed  8.24 ms/step 485.2 tokens/s, cache 40.00 MiB (= predicted 41943040 B)
                naive    17.48 ms/step 228.9 tokens/s, cache 320.0 MiB (= predicted 335544320 B)
  absorbed/naive tokens/s at 4096: 2.12
  The ratio at 4096 over that day's 21 runs of this code: median 2.12; 19 runs at 2.03-2.34,
  two under 2x (1.94 and 1.97).
  The host's load moves the two forms differently: a busy neighbour slows the compute-bound
  absorbed step most (up to ~11.8 ms), a quiet memory speeds the memory-bound naive one most
  (16.3-17.6 ms in the quietest runs, which gave 1.97-2.13). Other batches at 4096 (absorbed / naive ms per
  step, ratio): --batch=8 15.57 / 34.76, 2.23; --batch=16 27.19 / 66.39, 2.44.
  --nocpu_kernels (2026-11-25): 512: absorbed 16.60, naive 16.77 ms/step; 4096: absorbed 25.11,
  naive 30.58 ms/step, 1.22 (1.17 on 2026-11-24, before the kernels).
Where the absorbed step goes (jax.profiler, 4096 tokens, batch 4, 8.6 ms): the four attention
kernels ~0.8 ms each, folds included (alone on both cores ~0.70 ms median, ~0.63 at the 10th
percentile: the core ~0.56-0.60, the W^UK fold ~0.05, the W^UV fold ~0.02), the three
routed-expert layers ~0.8-1.0 ms each (~31 MiB of expert weights a layer: ~31 GB/s, the
memory's rate), the LM head ~0.6-0.7 ms (16 MiB), the dense layer's MLP ~0.37 ms, the other
decode-size products (q, kv, wo, shared experts) ~0.8 ms over the layers at 13-21 GB/s, XLA's
small ops the rest. The naive form's attention reads its 80 MiB a layer at the memory's rate:
~2.7 ms a layer.

So the absorbed cache is 8x smaller (exactly as predicted) and its step ~2.1x faster at 4096
(median 2.12 over 21 runs, 1.94-2.34): 2.0-2.1x when the host's memory is quiet, more when
it is busy. The absorbed attention does 8 heads x (128 + 32 + 128) multiply-adds per cached
latent (302 MFLOP a step over 4 layers at batch 4 x 4096), where the naive form only streams,
so the margin rests on the kernel's arithmetic rate: its score tile runs at ~94% of the FMA
peak on keys in L1, the whole core at ~65-80% of it from memory, and the step's other ~5.5 ms
(experts, head, projections: the same in both forms, bound by reading weights) dilute the
ratio.

History: 1.64x on 2026-11-25 (absorbed 16.22, naive 26.66 ms/step: the core at ~30% of the
FMA peak, the experts at ~22 GB/s); 2.02 (median of 13 runs) on the morning of 2026-12-07,
after the core's prefetch went into L2, its value tiles to 4 heads x 3 vectors and
`stream_rows` to applying each weight vector to every row (experts ~22 -> ~31 GB/s). Then, that
afternoon (decode rounding changed; the main job and `r1_seeds` were rerun for the README):
  - The score tile puts the 8 heads in the vector lanes: per latent dim one vector of the
    (transposed, pre-scaled) queries against each of 12 keys' element broadcast, 12 FMA
    chains, no cross-lane sums and every key read once per block (the 2 heads x 4 keys tile
    reloaded each key per head pair and summed across lanes): 0.75x the core's time in an
    interleaved A/B, two threads, b 4, t 4096.
  - Blocks of 36 keys, 3 whole tiles (32 left a 4-key tail tile): 0.91x.
  - Scores in log2 units (scale x log2(e) folded into the queries), so the softmax takes exp2.
  - Scores summed in blocks of 32 dims (float32 error as the old layout's; one 160-term chain
    doubled the error against float64 and failed the accuracy test): 1.03x.
  - The W^UK and W^UV folds inside the kernel: XLA's two dots took ~0.04 and ~0.075 ms a layer
    (the second on a strided slice of wkv_b), the kernel's ~0.05 and ~0.02.
  Tried and within noise or worse: an L1 prefetch of the next key tile; the mask and block max
  in the score tile's epilogue; exp2 by _mm256_round_ps; w read in order in the W^UK fold;
  more, smaller work items (8 and 16 instead of 4: 1.03x and 1.09x); prefetch distances 32,
  128 and 192 keys. Earlier (morning): prefetch distances 32-128 keys, blocks of 16-64 keys, an
  L1 prefetch of the next block.

Earlier settings, without the kernels (2026-11-24 and 25, at 4096, absorbed / naive ms per
step, tokens/s ratio):
  --batch=1: 17.1 / 59.1, 3.46: at batch 1 XLA:CPU transposes each layer's cache for the
    attention products (a copy per layer and step, in the optimized HLO), 8x more for naive.
  --batch=8: 34.4 / 44.4, 1.29.
  Before the MoE pair loop (load ~4): batch 4 69.9 / 79.2 ms (1.13), --scan_layers 263.6 / 620.0
  (2.35: the scan's cache copies), the naive cache laid out [b, T, h, d] as DeepSeek's 82.9 /
  268.2 (3.24: XLA:CPU transposes the whole key and value caches every step).
  XLA:CPU's dot libraries, by XLA_FLAGS: the default (YNNPACK dots) 25.82 / 30.95, 1.20;
    --xla_cpu_experimental_ynn_fusion_type= (Eigen) 33.36 / 32.12, 0.96; --xla_cpu_use_onednn
    19.88 / 22.98, 1.16; Eigen + --xla_cpu_experimental_xnn_fusion_type=dot 23.61 / 23.87,
    1.01; YNNPACK for dots, elementwise and reductions 25.51 / 29.24, 1.15.
  XLA's scores `bshc,btc->bsht` alone (8 MiB latent out of cache): 2.0 ms; the latent split into
    16 or 64 blocks of keys 1.6 ms; one vector product per head 2.8 ms; latent-major 2.0 ms; a
    multiply-and-sum 59 ms. The 8 heads make the scores a skinny product against the
    transposed latent, which XLA:CPU's dot kernels ran at ~4.5 GB/s: the reason for the kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util
from flax.linen import meta

from experiments.benchmarks.timing import time_steps
from r1jax.config import DECODE_CACHES, PRESETS, ModelConfig
from r1jax.model import Transformer
from r1jax.sizing import kv_cache_bytes_per_token

_PRESET = flags.DEFINE_enum("preset", "small", list(PRESETS), "Model preset.")
_CONTEXTS = flags.DEFINE_list("contexts", ["512", "4096"], "Context lengths (keys attended to).")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences decoded together.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per form (median reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per form first.", lower_bound=1)
_CHUNK = flags.DEFINE_integer("prefill_chunk", 512, "Prefill tokens per call.", lower_bound=1)
_SCAN = flags.DEFINE_bool("scan_layers", False, "Scan over layers (else unrolled).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the weights and tokens.")
_KERNELS = flags.DEFINE_bool(
  "cpu_kernels", True, "Both forms: r1jax's C++ XLA:CPU kernels (ModelConfig.cpu_kernels)."
)

FORMS = DECODE_CACHES  # ("absorbed", "naive")
_CACHED = {"absorbed": ("latent", "rope_key"), "naive": ("key", "value")}


def benchmark_config(
  preset: str, form: str, scan_layers: bool = False, cpu_kernels: bool = True
) -> ModelConfig:
  """The preset in float32 with MTP off, decoding with the `form` cache."""
  return ModelConfig.from_preset(
    preset,
    num_nextn_predict_layers=0,
    dtype="float32",
    param_dtype="float32",
    scan_layers=scan_layers,
    decode_cache=form,
    cpu_kernels=cpu_kernels,
  )


def init_variables(cfg: ModelConfig, seed: int):
  """Params and router bias (plain arrays): the same for both forms."""
  init = jax.jit(Transformer(cfg).init)
  variables = meta.unbox(init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
  return {k: variables[k] for k in ("params", "router_bias")}


def filled_cache(cfg: ModelConfig, variables, tokens: np.ndarray, chunk: int):
  """The decode cache after a prefill of tokens [b, T], chunk by chunk; it is T slots long."""
  decoder = Transformer(cfg, decode=True)
  cache = jax.jit(decoder.init)(jax.random.key(0), jnp.zeros(tokens.shape, jnp.int32))["cache"]
  prefill = jax.jit(
    lambda cache, t: decoder.apply({**variables, "cache": cache}, t, mutable=["cache"])[1],
    donate_argnums=0,
  )
  for start in range(0, tokens.shape[1], chunk):
    cache = prefill(cache, jnp.asarray(tokens[:, start : start + chunk]))["cache"]
  return jax.block_until_ready(cache)


def decode_step(cfg: ModelConfig, variables, cache, token: np.ndarray, context: int):
  """A closure that runs one jitted decode step (cache donated) and returns its logits [b, v].

  Each step first sets the write index to context - 1, so every step writes that slot and
  attends over exactly `context` keys. Compiled here, ahead of the timing; consumes `cache`.
  """
  decoder = Transformer(cfg, decode=True)
  b = token.shape[0]
  positions = jnp.full((b, 1), context - 1, jnp.int32)
  token = jnp.asarray(token)

  def step(cache):
    at_last_slot = lambda path, x: jnp.full_like(x, context - 1) if path[-1].key == "index" else x
    cache = jax.tree_util.tree_map_with_path(at_last_slot, cache)
    logits, updated = decoder.apply(
      {**variables, "cache": cache}, token, positions, mutable=["cache"]
    )
    return logits[:, -1], updated["cache"]

  compiled = jax.jit(step, donate_argnums=0).lower(cache).compile()
  box = [cache]

  def run() -> jax.Array:
    logits, box[0] = compiled(box[0])
    return jax.block_until_ready(logits)

  return run


def cache_bytes(cache, form: str) -> tuple[int, int]:
  """(bytes of the form's two cached arrays, bytes of the index and valid bookkeeping)."""
  flat = traverse_util.flatten_dict(cache)
  cached = sum(x.nbytes for path, x in flat.items() if path[-1] in _CACHED[form])
  return cached, sum(x.nbytes for x in flat.values()) - cached


def run_context(
  cfgs: dict[str, ModelConfig],
  variables,
  batch: int,
  context: int,
  steps: int,
  warmup: int,
  chunk: int,
  seed: int,
  log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
  """Fills both forms' caches to `context`, times their decode steps, logs a row per form.

  Returns:
    form -> {"seconds", "tokens_per_s", "cache_bytes", "predicted_bytes", "bookkeeping_bytes"}.
  """
  rng = np.random.RandomState(seed)
  vocab = next(iter(cfgs.values())).vocab_size
  prompt = rng.randint(0, vocab, (batch, context)).astype(np.int32)
  token = rng.randint(0, vocab, (batch, 1)).astype(np.int32)
  sides, out = {}, {}
  for form, cfg in cfgs.items():
    cache = filled_cache(cfg, variables, prompt, min(chunk, context))
    cached, bookkeeping = cache_bytes(cache, form)
    out[form] = {
      "cache_bytes": cached,
      "predicted_bytes": kv_cache_bytes_per_token(cfg, form) * batch * context,
      "bookkeeping_bytes": bookkeeping,
    }
    sides[form] = decode_step(cfg, variables, cache, token, context)
    del cache
  seconds, first = time_steps(sides, steps, warmup)
  diff = float(jnp.abs(first["naive"] - first["absorbed"]).max())
  scale = float(jnp.abs(first["absorbed"]).max())
  log(f"context {context}: first-step logits, max |naive - absorbed| = {diff:.2e} (of {scale:.2f})")
  for form in cfgs:
    row = out[form]
    row.update(seconds=seconds[form], tokens_per_s=batch / seconds[form])
    log(
      f"  {form:>8}: {row['seconds'] * 1e3:8.2f} ms/step {row['tokens_per_s']:8.1f} tokens/s  "
      f"cache {row['cache_bytes'] / 2**20:7.2f} MiB ({row['cache_bytes']} B; predicted "
      f"{row['predicted_bytes']} B) + {row['bookkeeping_bytes']} B index and valid"
    )
  return out


def run(
  preset: str,
  contexts: Sequence[int],
  batch: int,
  steps: int,
  warmup: int,
  chunk: int,
  scan_layers: bool = False,
  seed: int = 0,
  log: Callable[[str], None] = print,
  cpu_kernels: bool = True,
) -> dict[int, dict[str, dict[str, float]]]:
  """Both forms at each context; the last line is their tokens/s ratio at the longest."""
  cfgs = {form: benchmark_config(preset, form, scan_layers, cpu_kernels) for form in FORMS}
  cfg = cfgs["absorbed"]
  log(
    f"{preset}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
    f"{cfg.num_attention_heads} heads, float32, MTP off, layers "
    f"{'scanned' if scan_layers else 'unrolled'}, C++ CPU kernels {'on' if cpu_kernels else 'off'}; "
    f"batch {batch}, {steps} timed steps per form"
  )
  variables = init_variables(cfg, seed)
  results = {}
  for context in contexts:
    results[context] = run_context(cfgs, variables, batch, context, steps, warmup, chunk, seed, log)
  at = results[max(contexts)]
  ratio = at["absorbed"]["tokens_per_s"] / at["naive"]["tokens_per_s"]
  log(f"absorbed/naive tokens/s at {max(contexts)}: {ratio:.2f}")
  return results


def main(argv):
  del argv
  try:
    contexts = [int(c) for c in _CONTEXTS.value]
  except ValueError:
    raise app.UsageError(f"--contexts: {_CONTEXTS.value} are not all integers") from None
  limit = ModelConfig.from_preset(_PRESET.value).max_position_embeddings
  bad = [c for c in contexts if not 0 < c <= limit]
  if bad:
    raise app.UsageError(
      f"--contexts: {bad[0]} is not in [1, max_position_embeddings={limit}] of {_PRESET.value}"
    )
  print(f"backend {jax.default_backend()}, {jax.device_count()} devices, jax {jax.__version__}")
  run(
    _PRESET.value,
    contexts,
    _BATCH.value,
    _STEPS.value,
    _WARMUP.value,
    _CHUNK.value,
    _SCAN.value,
    _SEED.value,
    cpu_kernels=_KERNELS.value,
  )


if __name__ == "__main__":
  app.run(main)
