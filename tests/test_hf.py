"""r1jax.hf against transformers' DeepseekV3/V2: logits, greedy decoding, FP8, round trips, errors."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from flax.linen import meta

from r1jax import hf, safetensors_io, sharding
from r1jax.config import ModelConfig
from r1jax.model import Transformer
from tests.hf_fixtures import V3_CONFIGS, hf_model

KINDS = list(V3_CONFIGS) + ["e_v2_lite"]


def _tokens(shape, vocab=128, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _rel_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def saved_a(tmp_path_factory):
  """Config (a) saved by transformers, shared by the tests that need one HF checkpoint."""
  path = str(tmp_path_factory.mktemp("hf_a"))
  model = hf_model("a_qlora_yarn")
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(kind, tmp_path):
  model = hf_model(kind)
  model.save_pretrained(str(tmp_path))
  cfg, variables = hf.load(str(tmp_path), dtype="float32")
  assert ("router_bias" in variables) == (kind != "e_v2_lite")
  tokens = _tokens((2, 12))
  logits = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens))
  assert _rel_diff(logits, _hf_logits(model, tokens)) < 1e-5


def test_greedy_generation_matches_transformers(saved_a):
  model, path = saved_a
  cfg, variables = hf.load(path, dtype="float32")
  prompt, steps = _tokens((2, 5), seed=1), 32
  with torch.no_grad():
    expected = model.generate(
      torch.tensor(prompt, dtype=torch.long), max_new_tokens=steps, do_sample=False
    ).numpy()[:, prompt.shape[1] :]
  dec = Transformer(cfg, decode=True)
  shape = jnp.zeros((prompt.shape[0], prompt.shape[1] + steps), jnp.int32)
  cache = jax.jit(dec.init)(jax.random.key(0), shape)["cache"]

  @jax.jit
  def step(cache, tokens):
    logits, state = dec.apply({**variables, "cache": cache}, tokens, mutable=["cache"])
    return state["cache"], jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  cache, nxt = step(cache, jnp.asarray(prompt))
  out = [nxt]
  for _ in range(steps - 1):
    cache, nxt = step(cache, nxt[:, None])
    out.append(nxt)
  np.testing.assert_array_equal(np.stack(out, axis=1), expected)


def _quantize(w, block=128):
  """Block FP8 quantisation as the release does it: scale = amax / 448 per block."""
  m, n = w.shape
  scale = np.ones((-(-m // block), -(-n // block)), np.float32)
  for i in range(scale.shape[0]):
    for j in range(scale.shape[1]):
      blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
      scale[i, j] = max(np.abs(blk).max(), 1e-12) / 448.0
  expanded = np.repeat(np.repeat(scale, block, 0), block, 1)[:m, :n]
  return (w / expanded).astype(ml_dtypes.float8_e4m3fn), scale


@pytest.mark.parametrize("shape", [(200, 300), (576, 300), (128, 256)])
def test_dequantize_fp8_block_rule(shape):
  rng = np.random.RandomState(0)
  q, scale = _quantize(rng.randn(*shape).astype(np.float32))
  scale = scale * rng.uniform(0.5, 2.0, scale.shape).astype(np.float32)  # distinct per block
  assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
  out = hf.dequantize_fp8(q, scale)
  i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
  np.testing.assert_array_equal(out, q.astype(np.float32) * scale[i // 128, j // 128])
  assert out.dtype == np.float32


def test_load_dequantizes_fp8(saved_a, tmp_path):
  model, path = saved_a
  tensors = {k: v.numpy() for k, v in model.state_dict().items() if "rotary" not in k}
  ref = {}
  for name, w in list(tensors.items()):
    if w.ndim == 2 and "proj" in name and "eh_proj" not in name:  # FP8 set of SPEC 7.2
      q, scale = _quantize(w)
      tensors[name], tensors[name + "_scale_inv"] = q, scale
      ref[name] = hf.dequantize_fp8(q, scale)
  assert any(k.endswith("kv_a_proj_with_mqa.weight") for k in ref)
  # the same weights, dequantised here and stored as float32: load must give identical params
  plain = {k: v for k, v in {**tensors, **ref}.items() if not k.endswith("_scale_inv")}
  variables = {}
  for kind, checkpoint in (("fp8", tensors), ("plain", plain)):
    (tmp_path / kind).mkdir()
    # the per-expert release names, not transformers' fused 3-D parameters
    safetensors_io.write_safetensors(
      str(tmp_path / kind / "model.safetensors"), _split_experts(checkpoint)
    )
    (tmp_path / kind / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    variables[kind] = traverse_util.flatten_dict(hf.load(str(tmp_path / kind), dtype="float32")[1])
  wkv_a = np.asarray(variables["fp8"][("params", "moe_layers", "attn", "wkv_a")][0])
  np.testing.assert_array_equal(wkv_a, ref["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].T)
  assert not np.array_equal(wkv_a, tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].T)
  for key, value in variables["plain"].items():
    np.testing.assert_array_equal(np.asarray(variables["fp8"][key]), np.asarray(value))


@pytest.mark.parametrize("rules", ["ep_fsdp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_load_onto_a_mesh_places_every_leaf_on_its_sharding(saved_a, rules):
  """8 simulated devices, fsdp=2 x expert=2 x tensor=2: same values, the rules' shardings."""
  _, path = saved_a
  cfg, plain = hf.load(path, dtype="float32")
  mesh = sharding.make_mesh(fsdp=2, expert=2, tensor=2)
  _, placed = hf.load(path, dtype="float32", mesh=mesh, rules=rules)
  want = traverse_util.flatten_dict(sharding.param_shardings(cfg, mesh, sharding.RULES[rules]))
  flat_plain = traverse_util.flatten_dict(plain)
  split = 0
  for key, a in traverse_util.flatten_dict(placed).items():
    assert a.sharding.is_equivalent_to(want[key], a.ndim), key
    split += len({str(s.index) for s in a.addressable_shards}) > 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_plain[key]))
  assert split >= 10  # most weights really are split, not replicated
  tokens = jnp.asarray(_tokens((2, 12)))
  apply = jax.jit(Transformer(cfg).apply)
  assert _rel_diff(apply(placed, tokens), apply(plain, tokens)) < 1e-6


def test_load_onto_a_mesh_names_unknown_rules(saved_a):
  with pytest.raises(ValueError, match="rules: unknown preset 'tp'"):
    hf.load(saved_a[1], mesh=sharding.make_mesh(fsdp=2), rules="tp")


def _split_experts(tensors):
  """transformers' fused experts.gate_up_proj [E, 2F, D] / down_proj [E, D, F] -> per expert."""
  out = {}
  for name, w in tensors.items():
    if name.endswith("experts.gate_up_proj"):
      f = w.shape[1] // 2
      for e in range(w.shape[0]):
        out[f"{name[:-12]}{e}.gate_proj.weight"] = np.ascontiguousarray(w[e, :f])
        out[f"{name[:-12]}{e}.up_proj.weight"] = np.ascontiguousarray(w[e, f:])
    elif name.endswith("experts.down_proj"):
      for e in range(w.shape[0]):
        out[f"{name[:-9]}{e}.down_proj.weight"] = np.ascontiguousarray(w[e])
    else:
      out[name] = w
  return out


def _random_r1jax(cfg):
  """Random r1jax variables with non-trivial norms and router bias, as plain arrays."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  variables = meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens))
  flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "router_bias")})
  rng = np.random.RandomState(1)
  for key, value in flat.items():
    if key[-1] in ("scale", "correction_bias"):
      flat[key] = jnp.asarray(1.0 + 0.2 * rng.randn(*value.shape), value.dtype)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def saved_r1jax(tmp_path_factory):
  cfg = ModelConfig.from_preset("tiny", initializer_range=0.1)
  variables = _random_r1jax(cfg)
  path = str(tmp_path_factory.mktemp("r1jax"))
  hf.save(cfg, variables, path, max_shard_bytes=200_000)
  return cfg, variables, path


def test_save_load_round_trip_is_bit_identical(saved_r1jax):
  cfg, variables, path = saved_r1jax
  index = json.load(open(os.path.join(path, hf.INDEX_FILE)))
  assert len(set(index["weight_map"].values())) > 1  # sharded
  assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in index["weight_map"]
  assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
  loaded_cfg, loaded = hf.load(path)
  assert loaded_cfg.num_nextn_predict_layers == cfg.num_nextn_predict_layers
  want, got = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(loaded)
  assert want.keys() == got.keys()
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=str(key))


def test_saved_checkpoint_loads_in_transformers(saved_r1jax):
  cfg, variables, path = saved_r1jax
  model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"]
  # only the MTP layer is unexpected: the main model ignores layer 61 alone (SPEC 6.6)
  mtp = f"model.layers.{cfg.num_hidden_layers}."
  assert all(k.startswith(mtp) for k in info["unexpected_keys"])
  tokens = _tokens((2, 10), vocab=cfg.vocab_size)
  logits = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens))
  assert _rel_diff(logits, _hf_logits(model.float().eval(), tokens)) < 1e-5


# ----------------------------------------------------------------------------- errors
def _edit_checkpoint(src, dst, edit):
  """Copies the single-file checkpoint at src to dst with edit(tensors) applied."""
  tensors = {n: s.read(n) for n, s in safetensors_io.open_checkpoint(src).items()}
  edit(tensors)
  os.makedirs(dst, exist_ok=True)
  safetensors_io.write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  with (
    open(os.path.join(src, "config.json")) as f,
    open(os.path.join(dst, "config.json"), "w") as g,
  ):
    g.write(f.read())


def _assert_one_line_error(path, *words):
  with pytest.raises(ValueError) as err:
    hf.load(path)
  message = str(err.value)
  assert "\n" not in message
  for word in words:
    assert word in message


def test_missing_tensor_is_named(saved_a, tmp_path):
  name = "model.layers.1.mlp.experts.3.up_proj.weight"
  _edit_checkpoint(saved_a[1], str(tmp_path), lambda t: t.pop(name))
  _assert_one_line_error(str(tmp_path), name, "missing")


def test_wrong_shape_is_named(saved_a, tmp_path):
  name = "model.layers.0.self_attn.o_proj.weight"
  _edit_checkpoint(saved_a[1], str(tmp_path), lambda t: t.update({name: t[name][:, :-1].copy()}))
  _assert_one_line_error(str(tmp_path), name, "expected shape [32, 32]", "got [32, 31]")


def test_unknown_model_type_is_named(saved_a, tmp_path):
  _edit_checkpoint(saved_a[1], str(tmp_path), lambda t: None)
  config = json.load(open(tmp_path / "config.json"))
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  _assert_one_line_error(str(tmp_path), "model_type", "llama")


def test_truncated_shard_is_named(saved_a, tmp_path):
  _edit_checkpoint(saved_a[1], str(tmp_path), lambda t: None)
  file = tmp_path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2])
  _assert_one_line_error(str(tmp_path), str(file), "truncated")
