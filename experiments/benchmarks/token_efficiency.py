"""Token merging and local attention on `small`: forward time against the merge ratio, and short
training runs with and without the options, in one run.

  python -m experiments.benchmarks.token_efficiency --flagfile=experiments/configs/small_variants_cpu.flags
  python -m experiments.benchmarks.token_efficiency --ratios=0,0.5 --train_steps=0   # forward only

Model: the `small` preset (4 layers: 1 dense + 3 MoE of 64 experts, top-6) in float32 with MTP
off and the layers unrolled (the options need it; the baseline too, so that only the options
differ). Merging: tokens leave their slot at the input of --merge_layer and come back at
--inflate_layer (r1jax/layers/token_merge.py).

Forward: for each of --ratios, one jitted forward (logits) of the same weights (the inflation
gate at its initial ones) on the same [batch, seq] tokens; the steps alternate between the ratios
(the machine is shared: every ratio sees the same load), median ms reported with the tokens the
merged band runs on and the speed against ratio 0.

Training: --train_steps steps of [batch, --train_seq] of each variant (off; merging at --train_ratio; with
--train_windows also local attention, then both) from the same initial weights on the same
batches of the synthetic addition corpus (packed, as the trainer packs), AdamW with a linear
warmup; steps alternate between the variants. Reported per variant: the loss at step 0 and the
mean of the last 5 steps, and tokens/s (batch * seq / the median step time after --warmup
steps). The last line is `merge/off tokens/s ratio: X.XX`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from experiments.benchmarks.timing import time_steps
from r1jax import host_memory
from r1jax.config import PRESETS, ModelConfig
from r1jax.data.pipeline import DataConfig, make_pipeline
from r1jax.layers.token_merge import merge_count
from r1jax.model import Transformer
from r1jax.train.step import LossConfig, init_state, make_train_step

_PRESET = flags.DEFINE_enum("preset", "small", list(PRESETS), "Model preset.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 512, "Tokens per sequence.", lower_bound=4)
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.125", "0.25", "0.5"], "Forward: merge ratios.")
_MERGE = flags.DEFINE_integer("merge_layer", 1, "First layer on the merged tokens.")
_INFLATE = flags.DEFINE_integer("inflate_layer", 3, "First layer on every token again.")
_THRESHOLD = flags.DEFINE_float("merge_threshold", 0.9, "Cosine similarity merged first.")
_STEPS = flags.DEFINE_integer("steps", 10, "Forward: timed calls per ratio.", lower_bound=1)
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 40, "Training steps per variant (0: none).")
_TRAIN_SEQ = flags.DEFINE_integer("train_seq", 256, "Training: tokens per sequence.", lower_bound=4)
_TRAIN_RATIO = flags.DEFINE_float("train_ratio", 0.25, "Training: the merge ratio.")
_WINDOWS = flags.DEFINE_list("train_windows", [], "Training: also local attention, per layer.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed first steps of each variant.", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Training: peak AdamW learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the weights, tokens and corpus.")


def variant_config(preset: str, **variants) -> ModelConfig:
  """The preset in float32, MTP off, layers unrolled, with the given variant fields."""
  return ModelConfig.from_preset(
    preset,
    num_nextn_predict_layers=0,
    dtype="float32",
    param_dtype="float32",
    scan_layers=False,
    **variants,
  )


def _merge_fields(ratio: float) -> dict:
  if not ratio:
    return {}
  return dict(
    merge_ratio=ratio,
    merge_layer=_MERGE.value,
    inflate_layer=_INFLATE.value,
    merge_threshold=_THRESHOLD.value,
  )


def _with_gate(cfg: ModelConfig, params):
  """The shared weights plus the inflation gate (ones, its init) where merging is on."""
  if not cfg.merges_tokens:
    return params
  return {**params, "inflate": {"gate": jnp.ones((cfg.hidden_size,), jnp.float32)}}


def forward_times(preset, ratios, batch, seq, steps, seed) -> list[tuple[float, int, float]]:
  """(ratio, tokens in the merged band per row, median ms per forward) for each ratio."""
  base = variant_config(preset)
  tokens = jnp.asarray(np.random.RandomState(seed).randint(0, base.vocab_size, (batch, seq)))
  variables = jax.jit(Transformer(base).init)(jax.random.key(seed), tokens)
  calls = {}
  for ratio in ratios:
    cfg = variant_config(preset, **_merge_fields(ratio))
    state = {**variables, "params": _with_gate(cfg, variables["params"])}
    forward = jax.jit(Transformer(cfg).apply).lower(state, tokens).compile()
    calls[ratio] = lambda f=forward, s=state: jax.block_until_ready(f(s, tokens))
  seconds, _ = time_steps(calls, steps, warmup=2)
  return [(r, seq - merge_count(seq, r), 1e3 * seconds[r]) for r in ratios]


def training_runs(preset, variants: dict, batch, seq, steps, warmup, lr, seed):
  """{variant: (loss at step 0, mean loss of the last 5 steps, tokens/s)}."""
  data = make_pipeline(
    DataConfig(source="synthetic", seq_len=seq, batch_size=batch, seed=seed),
    vocab_size=variant_config(preset).vocab_size,
  )
  batches = [
    {k: jnp.asarray(v) for k, v in next(data).items()} for _ in range(steps)
  ]  # the same batches for every variant, made before the timing
  schedule = optax.linear_schedule(0.0, lr, max(1, steps // 10))
  optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1)
  first = batches[0]["tokens"]
  base = variant_config(preset)
  start = jax.jit(lambda key: init_state(Transformer(base), first, optimizer, key))(
    jax.random.key(seed)
  )
  runs = {}
  for name, fields in variants.items():
    cfg = variant_config(preset, **fields)
    params = _with_gate(cfg, start.params)
    state = dataclasses.replace(start, params=params, opt_state=optimizer.init(params))
    train = make_train_step(Transformer(cfg), optimizer, LossConfig(mtp_weight=0.0))
    runs[name] = {"state": state, "train": train, "losses": [], "i": 0}

  def call(run):
    b = batches[run["i"]]
    run["state"], metrics = run["train"](
      run["state"], b["tokens"], b["loss_mask"], b["positions"], b["segment_ids"]
    )
    run["losses"].append(float(metrics["lm_loss"]))  # waits for the step
    run["i"] += 1

  seconds, _ = time_steps({n: lambda r=r: call(r) for n, r in runs.items()}, steps - warmup, warmup)
  out = {}
  for name, run in runs.items():
    losses = run["losses"]
    out[name] = (
      losses[0],
      float(np.mean(losses[-5:])),
      batch * seq / seconds[name],
    )
  return out


def main(argv):
  del argv
  host_memory.retain_freed_memory()  # each step's XLA temp buffers, reused (not re-faulted)
  try:
    ratios = [float(r) for r in _RATIOS.value]
    windows = tuple(int(w) for w in _WINDOWS.value)
    for r in ratios + [_TRAIN_RATIO.value]:
      variant_config(_PRESET.value, **_merge_fields(r))
    if windows:
      variant_config(_PRESET.value, attention_windows=windows)
  except ValueError as err:
    raise app.UsageError(str(err)) from None
  print(
    f"{_PRESET.value}, float32, batch {_BATCH.value} x {_SEQ.value}, merged band: layers "
    f"[{_MERGE.value}, {_INFLATE.value}); {jax.devices()[0].device_kind}"
  )
  rows = forward_times(_PRESET.value, ratios, _BATCH.value, _SEQ.value, _STEPS.value, _SEED.value)
  base_ms = next((ms for r, _, ms in rows if r == 0), None)
  print("forward (median ms):")
  for ratio, band_tokens, ms in rows:
    speed = f", {base_ms / ms:.2f}x ratio 0" if base_ms else ""
    print(f"  ratio {ratio:<5} band tokens {band_tokens:>5}: {ms:8.1f} ms{speed}")
  if _TRAIN_STEPS.value <= _WARMUP.value:
    return
  variants = {"off": {}, "merge": _merge_fields(_TRAIN_RATIO.value)}
  if windows:
    variants["windows"] = {"attention_windows": windows}
    variants["both"] = {**variants["merge"], **variants["windows"]}
  runs = training_runs(
    _PRESET.value,
    variants,
    _BATCH.value,
    _TRAIN_SEQ.value,
    _TRAIN_STEPS.value,
    _WARMUP.value,
    _LR.value,
    _SEED.value,
  )
  print(
    f"training, {_TRAIN_STEPS.value} steps each, batch {_BATCH.value} x {_TRAIN_SEQ.value} "
    "(synthetic corpus, the same batches):"
  )
  for name, (first, last, tps) in runs.items():
    print(f"  {name:8} loss {first:.3f} -> {last:.3f} (last 5), {tps:8.1f} tokens/s")
  print(f"merge/off tokens/s ratio: {runs['merge'][2] / runs['off'][2]:.2f}")


if __name__ == "__main__":
  app.run(main)
