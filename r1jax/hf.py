"""Hugging Face checkpoints <-> r1jax variables (SPEC.md sections 6.5, 7 and 8).

`load` reads a DeepSeek V2/V3/R1 checkpoint directory (`config.json` plus safetensors, sharded
through `model.safetensors.index.json` or a single `model.safetensors`) into the variables of
`Transformer(cfg)`; `save` writes the release layout back (per-expert names, the MTP module at
layer `num_hidden_layers`), which `transformers.DeepseekV3ForCausalLM.from_pretrained` loads.

Usage:
    cfg, variables = load("/ckpt/DeepSeek-V3", dtype="float32")
    logits = Transformer(cfg).apply(variables, tokens)
    save(cfg, variables, "/tmp/out")

Tensors are read one at a time (`r1jax.safetensors_io`) and placed leaf by leaf, so peak host
memory is the model plus about one tensor (experiments/benchmarks/hf_load_memory.py measures it).
FP8 weights are dequantised with their `weight_scale_inv` block scales (`dequantize_fp8`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen import meta

from r1jax.config import ModelConfig
from r1jax.layers.common import dtype_of
from r1jax.model import Transformer
from r1jax.safetensors_io import (
  FP8,
  INDEX_FILE,
  Shard,
  TensorSpec,
  open_checkpoint,
  stream_safetensors,
)
from r1jax.sharding import RULES, param_shardings


# --------------------------------------------------------------------------- FP8
def dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray, block: int = 128) -> np.ndarray:
  """Block-dequantises an e4m3 weight: W[i, j] = float32(q[i, j]) * scale_inv[i // b, j // b].

  Args:
    q: [M, N] float8_e4m3fn weight.
    scale_inv: float32 [ceil(M / block), ceil(N / block)]; edge blocks may be partial (576 rows
      have 5 scale rows), so the expanded scales are cropped to [M, N].
    block: the square block size (128 in the release).

  Returns:
    float32 [M, N].
  """
  m, n = q.shape
  grid = (-(-m // block), -(-n // block))
  if tuple(scale_inv.shape) != grid:
    raise ValueError(f"scale_inv: shape {tuple(scale_inv.shape)} != {grid} for weight [{m}, {n}]")
  scales = np.repeat(np.repeat(scale_inv.astype(np.float32), block, 0), block, 1)[:m, :n]
  return q.astype(np.float32) * scales


# --------------------------------------------------------------------------- name mapping
@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor and the slot it fills in an r1jax leaf.

  HF Linear weights are [out, in]; r1jax kernels are [in, ...out dims], so `transpose` entries
  map as w.T.reshape(slot) and back as slot.reshape(shape[::-1]).T.
  """

  name: str  # HF tensor name
  collection: str  # "params" or "router_bias"
  path: tuple[str, ...]  # r1jax leaf path inside the collection
  index: tuple  # the slot inside that leaf (stacked layer, expert, gate/up half)
  shape: tuple[int, ...]  # HF shape
  transpose: bool


_ALL = slice(None)


def _attn_entries(cfg: ModelConfig, p: str, base, idx) -> list[_Entry]:
  """MLA projections and norms of one layer (HF prefix p, r1jax base path, stacked index)."""
  d, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
  qk, q = cfg.qk_head_dim, cfg.q_lora_rank
  rows = [
    ("input_layernorm.weight", ("attn_norm", "scale"), (d,)),
    ("post_attention_layernorm.weight", ("ffn_norm", "scale"), (d,)),
    ("self_attn.kv_a_proj_with_mqa.weight", ("attn", "wkv_a"), (c + cfg.qk_rope_head_dim, d)),
    ("self_attn.kv_a_layernorm.weight", ("attn", "kv_norm", "scale"), (c,)),
    (
      "self_attn.kv_b_proj.weight",
      ("attn", "wkv_b"),
      (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), c),
    ),
    ("self_attn.o_proj.weight", ("attn", "wo"), (d, h * cfg.v_head_dim)),
  ]
  if q:
    rows += [
      ("self_attn.q_a_proj.weight", ("attn", "wq_a"), (q, d)),
      ("self_attn.q_a_layernorm.weight", ("attn", "q_norm", "scale"), (q,)),
      ("self_attn.q_b_proj.weight", ("attn", "wq_b"), (h * qk, q)),
    ]
  else:
    rows.append(("self_attn.q_proj.weight", ("attn", "wq"), (h * qk, d)))
  return [_Entry(p + n, "params", base + sub, idx, s, len(s) == 2) for n, sub, s in rows]


def _swiglu_entries(p: str, path, idx, d: int, f: int) -> list[_Entry]:
  """gate/up/down of one SwiGLU -> wi [..., D, 2, F] (0 = gate, 1 = up) and wo [..., F, D]."""
  wi, wo = path + ("wi",), path + ("wo",)
  return [
    _Entry(p + "gate_proj.weight", "params", wi, idx + (_ALL, 0, _ALL), (f, d), True),
    _Entry(p + "up_proj.weight", "params", wi, idx + (_ALL, 1, _ALL), (f, d), True),
    _Entry(p + "down_proj.weight", "params", wo, idx, (d, f), True),
  ]


def _ffn_entries(cfg: ModelConfig, p: str, base, idx, moe: bool) -> list[_Entry]:
  d = cfg.hidden_size
  if not moe:
    return _swiglu_entries(p + "mlp.", base + ("mlp",), idx, d, cfg.intermediate_size)
  e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
  m = base + ("moe",)
  out = [_Entry(p + "mlp.gate.weight", "params", m + ("gate",), idx, (e, d), True)]
  if cfg.use_correction_bias:
    bias = p + "mlp.gate.e_score_correction_bias"
    out.append(_Entry(bias, "router_bias", m + ("correction_bias",), idx, (e,), False))
  for x in range(e):
    out += _swiglu_entries(f"{p}mlp.experts.{x}.", m, idx + (x,), d, f)
  if cfg.n_shared_experts:
    fs = cfg.n_shared_experts * f
    out += _swiglu_entries(p + "mlp.shared_experts.", m + ("shared_experts",), idx, d, fs)
  return out


def _layer_entries(cfg: ModelConfig, layer: int, base, idx, moe: bool) -> list[_Entry]:
  p = f"model.layers.{layer}."
  return _attn_entries(cfg, p, base, idx) + _ffn_entries(cfg, p, base, idx, moe)


def _mtp_entries(cfg: ModelConfig, k: int) -> list[_Entry]:
  """MTP depth k, stored as layer num_hidden_layers + k (SPEC.md 6.5)."""
  layer, d = cfg.num_hidden_layers + k, cfg.hidden_size
  p, base = f"model.layers.{layer}.", (f"mtp_{k}",)
  rows = [
    ("enorm.weight", ("enorm", "scale"), (d,)),
    ("hnorm.weight", ("hnorm", "scale"), (d,)),
    ("eh_proj.weight", ("eh_proj",), (d, 2 * d)),  # embedding-first input columns (SPEC 6.2)
    ("shared_head.norm.weight", ("shared_head_norm", "scale"), (d,)),
  ]
  out = [_Entry(p + n, "params", base + sub, (), s, len(s) == 2) for n, sub, s in rows]
  # The MTP block is always MoE, as in the release and in r1jax.layers.mtp.MTPLayer.
  return out + _layer_entries(cfg, layer, base + ("block",), (), moe=True)


def _entries(cfg: ModelConfig) -> list[_Entry]:
  """Every tensor of the checkpoint that r1jax reads, in release order."""
  v, d = cfg.vocab_size, cfg.hidden_size
  out = [_Entry("model.embed_tokens.weight", "params", ("embed",), (), (v, d), False)]
  for layer in range(cfg.num_hidden_layers):
    moe = layer >= cfg.first_k_dense_replace
    i = layer - cfg.first_k_dense_replace if moe else layer
    stack = ("moe_layers",) if moe else ("dense_layers",)
    out += _layer_entries(cfg, layer, stack, (i,), moe)
  for k in range(cfg.num_nextn_predict_layers):
    out += _mtp_entries(cfg, k)
  out.append(_Entry("model.norm.weight", "params", ("final_norm", "scale"), (), (d,), False))
  if not cfg.tie_word_embeddings:
    out.append(_Entry("lm_head.weight", "params", ("lm_head",), (), (v, d), True))
  return out


# --------------------------------------------------------------------------- load
def _read_config(path: str, dtype: str | None) -> ModelConfig:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise ValueError(f"config.json: not found in {path}; point load() at a checkpoint directory")
  with open(file) as f:
    hf = json.load(f)
  overrides = {"dtype": dtype} if dtype else {}
  return ModelConfig.from_hf_config(hf, **overrides)


def _check_tensors(entries: list[_Entry], tensors: dict[str, Shard]) -> None:
  """Every tensor present with the expected shape (and scales for FP8), before any read."""
  for e in entries:
    if e.name not in tensors:
      raise ValueError(
        f"{e.name}: missing from the checkpoint; is it complete and the config right?"
      )
    dtype, shape, _ = tensors[e.name].tensors[e.name]
    if shape != e.shape:
      raise ValueError(
        f"{e.name}: expected shape {list(e.shape)}, got {list(shape)}; check config.json"
      )
    if dtype == "F8_E4M3" and e.name + "_scale_inv" not in tensors:
      raise ValueError(f"{e.name}_scale_inv: missing; FP8 weights need their block scales")


def _stored_dtype(tensors: dict[str, Shard]) -> str:
  """The checkpoint's storage dtype as a ModelConfig dtype name (FP8 -> bfloat16)."""
  name = "model.embed_tokens.weight"
  if name not in tensors:
    raise ValueError(f"{name}: missing from the checkpoint")
  stored = tensors[name].tensors[name][0]
  return {"F32": "float32", "F16": "float16"}.get(stored, "bfloat16")


def _abstract_variables(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened (collection, *path) -> shape/dtype of Transformer(cfg).init, nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  variables = {k: v for k, v in variables.items() if k in ("params", "router_bias")}
  flat = traverse_util.flatten_dict(variables)
  return {k: (v.value if hasattr(v, "value") else v) for k, v in flat.items()}


def _read(tensors: dict[str, Shard], name: str) -> np.ndarray:
  w = tensors[name].read(name)
  if w.dtype == FP8:
    return dequantize_fp8(w, tensors[name + "_scale_inv"].read(name + "_scale_inv"))
  return w


def _leaf_dtype(cfg: ModelConfig, key: tuple[str, ...]) -> np.dtype:
  """Router bias in float32 (SPEC 7.2), params in param_dtype."""
  return np.dtype(np.float32 if key[0] == "router_bias" else dtype_of(cfg.param_dtype))


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty on a 64-byte boundary: jax then adopts the buffer on CPU instead of copying it
  (measured on the small preset: load's peak host memory fell from ~2.1x to ~1x the model)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buffer = np.empty(nbytes + align, np.uint8)
  offset = (-buffer.ctypes.data) % align
  return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _copy_slot(buffer: np.ndarray, shard: tuple, slot: tuple, value: np.ndarray, shape) -> None:
  """Writes the part of one entry's slot that falls inside one shard of a leaf.

  Args:
    buffer: the shard's host buffer (the shard's shape).
    shard: the shard's index into the leaf (one slice per dim).
    slot: the entry's index into the leaf (ints for stacked dims, full slices otherwise).
    value: the slot's contents (the leaf's shape without the int dims of `slot`).
    shape: the leaf's shape.
  """
  slot = slot + (_ALL,) * (len(shape) - len(slot))
  dst, src = [], []
  for sel, part, size in zip(slot, shard, shape, strict=True):
    lo, hi, _ = part.indices(size)
    if isinstance(sel, int):
      if not lo <= sel < hi:
        return  # the slot lies in another shard
      dst.append(sel - lo)
    else:
      dst.append(slice(0, hi - lo))
      src.append(slice(lo, hi))
  buffer[tuple(dst)] = value[tuple(src)]


def _shard_key(index: tuple, shape) -> tuple:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _load_leaf(entries: list[_Entry], shape, dtype, sharding, tensors) -> jax.Array:
  """Reads the tensors of one leaf and places its shards on their devices.

  Each tensor is read once. The host holds the leaf's distinct addressable shards (one buffer per
  group of replicas, not per device) and one tensor at a time.
  """
  index_map = sharding.addressable_devices_indices_map(shape)
  buffers: dict[tuple, tuple[tuple, np.ndarray]] = {}
  for index in index_map.values():
    key = _shard_key(index, shape)
    if key not in buffers:
      buffers[key] = (index, _aligned_empty(tuple(hi - lo for lo, hi in key), dtype))
  for e in entries:
    w = _read(tensors, e.name)
    slot = e.index + (_ALL,) * (len(shape) - len(e.index))
    w = (w.T if e.transpose else w).reshape(
      [n for s, n in zip(slot, shape, strict=True) if s == _ALL]
    )
    for index, buffer in buffers.values():
      _copy_slot(buffer, index, e.index, w, shape)
  shards = [jax.device_put(buffers[_shard_key(i, shape)][1], d) for d, i in index_map.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _place(cfg, entries, tensors, sharding_of, progress=None) -> dict[tuple[str, ...], jax.Array]:
  """Loads every leaf in turn onto `sharding_of(leaf key)`; every leaf must be covered."""
  by_leaf: dict[tuple[str, ...], list[_Entry]] = {}
  for e in entries:
    by_leaf.setdefault((e.collection,) + e.path, []).append(e)
  abstract = _abstract_variables(cfg)
  unfilled = sorted("/".join(k) for k in set(abstract) - set(by_leaf))
  if unfilled:
    raise ValueError(f"{unfilled[0]}: no checkpoint tensor maps to this r1jax leaf (loader bug)")
  out, done = {}, 0
  for key, leaf_entries in by_leaf.items():
    if progress is not None:
      progress(done + len(leaf_entries) - 1, len(entries), leaf_entries[-1].name)
    shape, dtype = abstract[key].shape, _leaf_dtype(cfg, key)
    out[key] = _load_leaf(leaf_entries, shape, dtype, sharding_of(key), tensors)
    done += len(leaf_entries)
  return out


def _resolve(path: str, dtype, param_dtype) -> tuple[ModelConfig, dict[str, Shard]]:
  """The config `load` will build (dtypes and MTP depth resolved) and the tensor index."""
  cfg = _read_config(path, dtype)
  tensors = open_checkpoint(path)
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype or _stored_dtype(tensors))
  mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
  if cfg.num_nextn_predict_layers and not any(n.startswith(mtp_prefix) for n in tensors):
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
  return cfg, tensors


def read_config(path: str, *, param_dtype: str | None = None) -> ModelConfig:
  """The ModelConfig `load(path, param_dtype=...)` returns, reading only headers."""
  return _resolve(path, None, param_dtype)[0]


def load(
  path: str,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: str = "ep_fsdp",
  progress: Callable[[int, int, str], None] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a DeepSeek V2/V3/R1 HF checkpoint directory.

  Tensors are read one at a time, grouped by the r1jax leaf they fill (all layers' experts of one
  projection make one stacked leaf). A leaf is assembled on the host in its addressable shards
  and placed on its devices before the next leaf is read: the host holds at most one leaf's
  shards beside what is already placed, and on a multi-host mesh each process assembles only
  the shards its own devices hold.

  Args:
    path: directory with `config.json` and the safetensors (sharded with an index, or single).
    dtype: overrides the compute dtype of the config (e.g. "float32").
    param_dtype: the dtype params are held in; None keeps the checkpoint's storage dtype (that
      of `embed_tokens`: bfloat16 for the release, whose FP8 weights dequantise to bfloat16 as
      DeepSeek's own `fp8_cast_bf16` does). The router correction bias is always float32.
    mesh: place each leaf onto its sharding under `rules` (`r1jax.sharding`); None puts
      everything on the first device.
    rules: name of an `r1jax.sharding.RULES` preset; used only with a mesh.
    progress: called as progress(i, n, tensor_name) once tensors up to i of n have been read.

  Returns:
    (cfg, variables) with variables = {"params": ..., "router_bias": ...} (router_bias only for
    noaux_tc configs), ready for `Transformer(cfg).apply(variables, tokens)`. A checkpoint without
    MTP tensors (as transformers' save_pretrained writes) loads with num_nextn_predict_layers=0.

  Raises:
    ValueError: one line naming the field, tensor or file, before any tensor is read.
  """
  cfg, tensors = _resolve(path, dtype, param_dtype)
  entries = _entries(cfg)
  _check_tensors(entries, tensors)
  if mesh is None:
    first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding_of = lambda key: first  # noqa: E731
  else:
    if rules not in RULES:
      raise ValueError(f"rules: unknown preset {rules!r}; choose one of {sorted(RULES)}")
    named = param_shardings(cfg, mesh, RULES[rules])
    sharding_of = traverse_util.flatten_dict(named).__getitem__
  return cfg, traverse_util.unflatten_dict(_place(cfg, entries, tensors, sharding_of, progress))


# --------------------------------------------------------------------------- save
def _hf_tensors(cfg: ModelConfig, variables: dict[str, Any]) -> list[TensorSpec]:
  """The checkpoint's tensors in release order, embed/head duplicated into the MTP layers.

  Nothing is computed here: shapes and dtypes are known up front, so the writer can lay out
  each file's header first and then produce the tensors one at a time.
  """
  flat = traverse_util.flatten_dict(_unboxed(variables))
  host: dict[tuple[str, ...], np.ndarray] = {}

  def leaf(key):  # zero-copy for single-device CPU arrays; gathers a sharded leaf once
    if key not in host:
      host[key] = np.asarray(flat[key])
    return host[key]

  def slot(e: _Entry):
    s = leaf((e.collection,) + e.path)[e.index]
    return s.reshape(e.shape[::-1]).T if e.transpose else s.reshape(e.shape)

  out = []
  for e in _entries(cfg):
    dtype = np.dtype(flat[(e.collection,) + e.path].dtype)
    out.append(TensorSpec(e.name, e.shape, dtype, functools.partial(slot, e)))
    if e.name.endswith("eh_proj.weight"):
      # release checkpoints carry copies of the shared embedding and head in each MTP layer
      p = e.name[: -len("eh_proj.weight")]
      embed = ("params", "embed")
      v_d = flat[embed].shape
      out.append(TensorSpec(p + "embed_tokens.weight", v_d, dtype, functools.partial(leaf, embed)))
      if cfg.tie_word_embeddings:
        head = functools.partial(leaf, embed)
      else:
        head = lambda: leaf(("params", "lm_head")).T  # noqa: E731
      out.append(TensorSpec(p + "shared_head.head.weight", v_d, dtype, head))
  return out


def _unboxed(variables: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in meta.unbox(dict(variables)).items() if k in ("params", "router_bias")}


def _shard_plan(tensors: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Consecutive tensors grouped into files of at most max_shard_bytes (a larger tensor alone)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for t in tensors:
    nbytes = math.prod(t.shape) * t.dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  return shards


def save(
  cfg: ModelConfig,
  variables: dict[str, Any],
  path: str,
  *,
  max_shard_bytes: int = 5 * 2**30,
  progress: Callable[[int, int, str], None] | None = None,
) -> str:
  """Writes `variables` as an HF checkpoint directory in the release layout.

  Files: `config.json` (cfg.to_hf_config()), `model-0000i-of-0000n.safetensors` shards of at most
  `max_shard_bytes` (a larger single tensor gets a shard of its own) and
  `model.safetensors.index.json`. Tensors keep their dtype, so `load(save(...))` is bit-identical.
  Each file's header is written from the known shapes, then its tensors are produced and written
  one at a time: beside the model, the host holds one converted tensor (and, for a leaf sharded
  over several devices, that leaf gathered to the host).

  Returns:
    path.
  """
  if not cfg.scan_layers:
    raise ValueError("scan_layers: save() expects stacked layers; use scan_layers=True")
  tensors = _hf_tensors(cfg, variables)
  plan = _shard_plan(tensors, max_shard_bytes)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf_config(), f, indent=2)
  weight_map, done = {}, 0
  for i, shard in enumerate(plan, start=1):
    file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
    temp = os.path.join(path, f".{file}.tmp")  # a killed save leaves no file that looks whole
    with open(temp, "wb") as f:
      for t in stream_safetensors(f, shard):
        if progress is not None:
          progress(done, len(tensors), t.name)
        done += 1
    os.replace(temp, os.path.join(path, file))
    weight_map.update(dict.fromkeys((t.name for t in shard), file))
  total = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
  return path


if __name__ == "__main__":
  import sys

  from r1jax.hf_convert import main

  sys.exit(main())
