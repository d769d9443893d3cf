"""MLA's two decode-cache forms (ModelConfig.decode_cache): the same logits as each other and as
the full forward, the sizes `kv_cache_bytes_per_token` predicts, the generator and sharding
unchanged."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from r1jax import ModelConfig, kv_cache_bytes_per_token, sharding
from r1jax.generate import Generator, SamplingConfig, pad_prompts
from r1jax.model import Transformer
from r1jax.train import trainer
from r1jax.train.loop import TrainConfig

TINY = ModelConfig.from_preset("tiny")  # float32; MTP on, as the cache must ignore it
FORMS = ("absorbed", "naive")
ARRAYS = {"absorbed": ("latent", "rope_key"), "naive": ("key", "value")}


def _cfg(form: str, **overrides) -> ModelConfig:
  return dataclasses.replace(TINY, decode_cache=form, **overrides)


@pytest.fixture(scope="module")
def variables():
  v = meta.unbox(jax.jit(Transformer(TINY).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  # A larger head scale so that the random model's greedy choices are not near-ties.
  v["params"]["lm_head"] = v["params"]["lm_head"] * 20.0
  return {k: v[k] for k in ("params", "router_bias")}


def _greedy(cfg, variables, prompt, new_tokens: int, prefill_chunk: int):
  """Greedy decode through the cache: the prompt [b, p] in chunks, then one token at a time.
  Returns (all tokens [b, p + new_tokens], the logits that chose each new token [b, n, v])."""
  decoder = Transformer(cfg, decode=True)
  b, p = prompt.shape
  slots = jnp.zeros((b, p + new_tokens), jnp.int32)
  cache = jax.jit(decoder.init)(jax.random.key(0), slots)["cache"]
  step = jax.jit(lambda c, t: decoder.apply({**variables, "cache": c}, t, mutable=["cache"]))
  for start in range(0, p, prefill_chunk):
    logits, cache = step(cache, prompt[:, start : start + prefill_chunk])
    cache = cache["cache"]
  tokens, chosen = [prompt], []
  for _ in range(new_tokens):
    chosen.append(logits[:, -1])
    tokens.append(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))
    logits, cache = step(cache, tokens[-1])
    cache = cache["cache"]
  return jnp.concatenate(tokens, axis=1), jnp.stack(chosen, axis=1)


# Token by token (chunk 1) is slow-marked for CI time: tests/test_mla.py decodes token by token.
@pytest.mark.parametrize("prefill_chunk", [pytest.param(1, marks=pytest.mark.slow), 4])
def test_greedy_decode_is_the_same_with_either_cache_and_the_full_forward(variables, prefill_chunk):
  prompt = jax.random.randint(jax.random.key(1), (2, 4), 0, TINY.vocab_size)
  n = 6
  out = {form: _greedy(_cfg(form), variables, prompt, n, prefill_chunk) for form in FORMS}
  (absorbed_tokens, absorbed), (naive_tokens, naive) = out["absorbed"], out["naive"]
  np.testing.assert_array_equal(np.asarray(naive_tokens), np.asarray(absorbed_tokens))
  full = jax.jit(Transformer(TINY).apply)(variables, absorbed_tokens)[:, 3:-1]  # chose each new
  scale = float(jnp.abs(full).max())
  for got in (absorbed, naive):
    assert float(jnp.abs(got - full).max()) / scale < 1e-5
  assert float(jnp.abs(naive - absorbed).max()) / scale < 1e-5


def test_generator_samples_the_same_with_either_cache(variables):
  """Left-padded prompts of different lengths: the valid slots work the same in both forms."""
  prompts, lengths = pad_prompts([[65, 66, 67, 68, 69], [72, 73]], 6, pad_id=0)
  out = {}
  for form in FORMS:
    gen = Generator(_cfg(form), max_prompt_len=6, max_new_tokens=5, eos_id=3)
    out[form] = gen(variables, prompts, lengths, jax.random.key(2), SamplingConfig(0.0))
  np.testing.assert_array_equal(np.asarray(out["naive"].tokens), np.asarray(out["absorbed"].tokens))
  np.testing.assert_allclose(
    np.asarray(out["naive"].logprobs), np.asarray(out["absorbed"].logprobs), atol=1e-5
  )


def _cache_shapes(cfg, b: int, t: int):
  init = Transformer(cfg, decode=True).init
  shapes = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((b, t), jnp.int32))
  return traverse_util.flatten_dict(shapes["cache"])


@pytest.mark.parametrize("form", FORMS)
def test_cache_holds_the_bytes_kv_cache_bytes_per_token_predicts(form):
  """The form's two arrays, per layer and summed over the main layers: what
  `kv_cache_bytes_per_token` counts (an MTP block that decodes keeps one more layer's cache,
  which it does not count); index and valid are bookkeeping."""
  cfg = _cfg(form)
  b, t = 3, 7
  flat = _cache_shapes(cfg, b, t)
  assert {path[-1] for path in flat} == {*ARRAYS[form], "index", "valid"}
  nbytes = lambda s: math.prod(s.shape) * s.dtype.itemsize
  cached = {path: s for path, s in flat.items() if path[-1] in ARRAYS[form]}
  per_layer = kv_cache_bytes_per_token(cfg, form) // cfg.num_hidden_layers
  stacks = {"dense_layers": cfg.first_k_dense_replace, "moe_layers": cfg.num_moe_layers}
  for stack, layers in stacks.items():
    arrays = [s for path, s in cached.items() if path[0] == stack]
    assert all(s.shape[:2] == (layers, b) and t in s.shape[2:4] for s in arrays), stack
    assert sum(map(nbytes, arrays)) == per_layer * layers * b * t, stack
  main = sum(nbytes(s) for path, s in cached.items() if path[0] in stacks)
  assert main == kv_cache_bytes_per_token(cfg, form) * b * t
  assert all(path[0] in stacks or path[0].startswith("mtp_") for path in cached)
  mtp = sum(nbytes(s) for path, s in cached.items() if path[0] not in stacks)
  assert mtp in (0, per_layer * b * t * cfg.num_nextn_predict_layers)


def test_naive_cache_holds_per_head_keys_and_values():
  flat = _cache_shapes(_cfg("naive"), 3, 7)
  layers, h = TINY.num_moe_layers, TINY.num_attention_heads
  assert flat[("moe_layers", "attn", "key")].shape == (layers, 3, h, 7, TINY.qk_head_dim)
  assert flat[("moe_layers", "attn", "value")].shape == (layers, 3, h, 7, TINY.v_head_dim)


@pytest.mark.slow  # CI time: tests/test_sharding.py shards the absorbed cache in the fast suite
def test_sharded_naive_cache_gives_the_same_logits(variables):
  """Batch over data x expert and heads over tensor, as `cache_shardings` places them."""
  cfg = _cfg("naive")
  decoder = Transformer(cfg, decode=True)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 4)), jnp.int32)
  cache = jax.jit(decoder.init)(jax.random.key(0), jnp.zeros((4, 16), jnp.int32))["cache"]
  step = jax.jit(lambda v, t: decoder.apply(v, t, mutable=["cache"]))
  want, _ = step({**variables, "cache": cache}, tokens)

  mesh = sharding.make_mesh(data=2, expert=2, tensor=2)
  rules = sharding.RULES["ep_fsdp"]
  cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh, rules))
  key = cache["moe_layers"]["attn"]["key"]  # [layers, b, h, t, d]
  assert key.sharding.spec == jax.sharding.PartitionSpec(
    None, ("data", "expert"), "tensor", None, None
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules.as_flax()):
    got, _ = step({**variables, "cache": cache}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_decode_cache_is_one_line_naming_the_field():
  with pytest.raises(ValueError) as err:
    _cfg("paged")
  message = str(err.value)
  assert message.startswith("decode_cache: 'paged'") and "naive" in message
  assert "\n" not in message


def test_decode_cache_is_not_architecture():
  """Not exported to HF configs, kept through a round trip's overrides, and a run may resume
  with the other form (it decodes the same model)."""
  cfg = _cfg("naive")
  assert "decode_cache" not in cfg.to_hf_config()
  back = ModelConfig.from_hf_config(
    cfg.to_hf_config(), dtype=cfg.dtype, initializer_range=cfg.initializer_range
  )
  assert dataclasses.replace(back, decode_cache="naive") == cfg
  assert trainer._RESUMABLE_CHANGES["model"] >= {"decode_cache", "moe_impl"}


def test_resume_accepts_the_other_cache_form(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(TINY)}))
  trainer.check_resume(str(tmp_path), _cfg("naive"), TrainConfig(), None)
  with pytest.raises(ValueError, match="kv_lora_rank=16"):  # an architecture change still refuses
    trainer.check_resume(str(tmp_path), _cfg("naive", kv_lora_rank=8), TrainConfig(), None)


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_empty_cache_is_what_init_builds(form):
  from r1jax import empty_cache

  cfg = dataclasses.replace(ModelConfig.from_preset("tiny"), decode_cache=form)
  built = jax.jit(Transformer(cfg, decode=True).init)(
    jax.random.key(1), jnp.zeros((2, 24), jnp.int32)
  )["cache"]
  made = empty_cache(cfg, 2, 24)
  assert jax.tree.structure(made) == jax.tree.structure(built)
  for a, b in zip(jax.tree.leaves(made), jax.tree.leaves(built), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
