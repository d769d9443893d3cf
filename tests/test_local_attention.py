"""Hybrid local/global attention (`ModelConfig.attention_windows`): the banded-mask reference in
the naive, absorbed and decode forms, the ring-buffer cache, and bit-identity when off."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig, Transformer
from r1jax.generate import Generator, SamplingConfig, pad_prompts
from r1jax.layers.mla import MLA
from r1jax.layers.rope import inverse_frequencies, softmax_scale
from tests.references import np_mla

TINY = ModelConfig.from_preset("tiny", scan_layers=False)
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_logits_before_variants.npz")


def _mla_params(cfg, window, x, positions):
  params = jax.jit(MLA(cfg, window=window).init)(jax.random.key(1), x, positions)
  params = flax.linen.meta.unbox(params)
  flat = dict(params["params"])
  flat["kv_norm_scale"] = flat.pop("kv_norm")["scale"]
  flat["q_norm_scale"] = flat.pop("q_norm")["scale"]
  return params, flat


def _banded_reference(cfg, flat, x, positions, window):
  return np_mla(
    flat, x, np.asarray(positions), cfg, inverse_frequencies(cfg), softmax_scale(cfg), window
  )


@pytest.mark.parametrize("window", [1, 3, 9])
def test_naive_local_attention_equals_the_banded_mask(window):
  """Training form: MLA with window W against the float64 re-derivation with mask i-W < j <= i."""
  x = jax.random.normal(jax.random.key(0), (2, 9, TINY.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  params, flat = _mla_params(TINY, window, x, positions)
  out = jax.jit(MLA(TINY, window=window).apply)(params, x, positions)
  want = _banded_reference(TINY, flat, x, positions, window)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  if window < 9:  # the window changes the output (tokens beyond it were attended to before)
    full = _banded_reference(TINY, flat, x, positions, 0)
    assert np.abs(full - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("form", ["absorbed", "naive"])
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 4, 1], [2, 5, 2]])
def test_decode_forms_with_a_ring_cache_equal_the_banded_mask(form, chunks):
  """The absorbed (latent) and naive cache forms, token by token and in chunks shorter and
  longer than the window, against the banded reference; the ring holds W = 3 slots."""
  window = 3
  cfg = ModelConfig.from_preset("tiny", scan_layers=False, decode_cache=form)
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  params, flat = _mla_params(cfg, window, x, positions)
  mla = MLA(cfg, decode=True, window=window)
  cache = jax.jit(mla.init)(jax.random.key(0), x, positions)["cache"]
  step = jax.jit(lambda c, x, p: mla.apply({**params, "cache": c}, x, p, mutable=["cache"]))
  outputs, start = [], 0
  for size in chunks:
    out, updated = step(cache, x[:, start : start + size], positions[:, start : start + size])
    cache, start = updated["cache"], start + size
    outputs.append(out)
  first = cache["latent" if form == "absorbed" else "key"]
  assert first.shape[1 if form == "absorbed" else 2] == window
  want = _banded_reference(cfg, flat, x, positions, window)
  got = np.concatenate([np.asarray(o) for o in outputs], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_ring_cache_holds_at_most_w_latents_and_global_layers_every_slot():
  cfg = ModelConfig.from_preset("tiny", scan_layers=False, attention_windows=(0, 4, 16))
  tokens = jnp.zeros((3, 10), jnp.int32)
  cache = jax.eval_shape(Transformer(cfg, decode=True).init, jax.random.key(0), tokens)["cache"]
  latent = lambda stack, i: cache[stack][f"layer_{i}"]["attn"]["latent"].shape
  assert latent("dense_layers", 0) == (3, 10, cfg.kv_lora_rank)  # global: every slot
  assert latent("moe_layers", 0) == (3, 4, cfg.kv_lora_rank)  # W = 4
  assert latent("moe_layers", 1) == (3, 10, cfg.kv_lora_rank)  # W = 16 > 10 slots: all of them
  assert cache["moe_layers"]["layer_0"]["attn"]["valid"].shape == (3, 4)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_model_decode_with_mixed_windows_equals_its_full_forward(form):
  """A hybrid stack (global, W=2, W=5) decoded token by token (and after a 6-token prefill)
  gives the logits of its full forward."""
  cfg = ModelConfig.from_preset(
    "tiny", scan_layers=False, attention_windows=(0, 2, 5), decode_cache=form
  )
  tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab_size)
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.key(3), tokens)
  full = jax.jit(model.apply)(variables, tokens)
  decoder = Transformer(cfg, decode=True)
  params = {k: variables[k] for k in ("params", "router_bias")}
  step = jax.jit(lambda c, t: decoder.apply({**params, "cache": c}, t, mutable=["cache"]))
  for chunks in ([1] * 11, [6, 1, 1, 1, 1, 1]):
    cache = jax.jit(decoder.init)(jax.random.key(0), tokens)["cache"]
    outputs, start = [], 0
    for size in chunks:
      logits, updated = step(cache, tokens[:, start : start + size])
      cache, start = updated["cache"], start + size
      outputs.append(logits)
    decoded = jnp.concatenate(outputs, axis=1)
    scale = float(jnp.abs(full).max())
    assert float(jnp.abs(decoded - full).max()) / scale < 1e-5, chunks


def test_generator_with_local_layers_decodes_greedy_as_full_forwards():
  """Left-padded prompts of different lengths through `Generator` (one jit, ring caches): the
  greedy tokens of repeated full forwards over each unpadded row."""
  cfg = ModelConfig.from_preset("tiny", scan_layers=False, attention_windows=(2, 0, 3))
  rows = [[65, 66, 67, 68, 69], [72, 73]]
  variables = jax.jit(Transformer(cfg).init)(jax.random.key(5), jnp.zeros((1, 8), jnp.int32))
  prompts, lengths = pad_prompts(rows, 6, pad_id=0)
  gen = Generator(cfg, max_prompt_len=6, max_new_tokens=5, eos_id=3)
  out = gen(variables, prompts, lengths, jax.random.key(2), SamplingConfig(0.0))
  forward = jax.jit(Transformer(cfg).apply)
  for row, prompt in enumerate(rows):
    sequence = list(prompt)
    for _ in range(int(out.lengths[row])):
      sequence.append(int(jnp.argmax(forward(variables, jnp.asarray([sequence]))[0, -1])))
    n = int(out.lengths[row])
    assert np.asarray(out.tokens[row, :n]).tolist() == sequence[len(prompt) :]


def _logits(cfg, tokens):
  model = Transformer(cfg)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  return variables, np.asarray(jax.jit(model.apply)(variables, tokens))


@pytest.mark.parametrize("scan", [True, False])
def test_with_every_option_off_the_model_is_bit_identical(scan):
  """Windows all 0 and merge_ratio 0 (the other merge fields set) give the preset's params and
  logits bit for bit; and the preset gives the logits written before the options existed
  (tests/golden, float32 on the 2-core x86-64 CPU: equal to the last bit there at XLA's default
  LLVM level; the suite compiles at -O0 (conftest), which moves a few logits of magnitude ~0.01
  by ~1.3e-7, hence atol 1e-6: a change to the model moves them by orders of magnitude more)."""
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  preset = ModelConfig.from_preset("tiny", scan_layers=scan, dtype="float32")
  off = ModelConfig.from_preset(
    "tiny",
    scan_layers=scan,
    dtype="float32",
    attention_windows=(0, 0, 0),
    merge_ratio=0.0,
    merge_layer=0,
    inflate_layer=3,
  )
  assert not off.has_variants
  variables, want = _logits(preset, tokens)
  variables_off, got = _logits(off, tokens)
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, variables_off))
  np.testing.assert_array_equal(got, want)
  golden = np.load(GOLDEN)[f"forward_scan{int(scan)}"]
  np.testing.assert_allclose(got, golden, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  ("overrides", "field"),
  [
    ({"attention_windows": (0, 4)}, "attention_windows"),
    ({"attention_windows": (0, -1, 0)}, "attention_windows"),
    ({"attention_windows": (0, 4, 0), "scan_layers": True}, "scan_layers"),
    ({"merge_ratio": 0.7}, "merge_ratio"),
    ({"merge_ratio": 0.25, "merge_layer": 2, "inflate_layer": 2}, "merge_layer"),
    ({"merge_ratio": 0.25, "merge_layer": 1, "inflate_layer": 4}, "merge_layer"),
    ({"merge_threshold": 1.5}, "merge_threshold"),
  ],
)
def test_bad_variant_fields_are_named(overrides, field):
  overrides = {"scan_layers": False, **overrides}
  with pytest.raises(ValueError, match=f"^{field}: "):
    ModelConfig.from_preset("tiny", **overrides)


def test_a_model_with_variants_has_no_hf_config():
  cfg = ModelConfig.from_preset("tiny", scan_layers=False, attention_windows=(0, 4, 0))
  with pytest.raises(ValueError, match="^attention_windows / merge_ratio: "):
    cfg.to_hf_config()


def test_speculative_decoding_refuses_local_layers():
  """Rejected drafts leave cache holes, and a window counts slots: refused, field named."""
  from r1jax.speculative import SpeculativeGenerator

  cfg = ModelConfig.from_preset("tiny", scan_layers=False, attention_windows=(0, 4, 0))
  with pytest.raises(ValueError, match="^attention_windows: speculative decoding"):
    SpeculativeGenerator(cfg, max_prompt_len=4, max_new_tokens=4, eos_id=3)
