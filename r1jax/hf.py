"""Hugging Face checkpoints <-> r1jax variables (SPEC.md sections 6.5, 7 and 8).

`load` reads a DeepSeek V2/V3/R1 checkpoint directory (`config.json` plus safetensors, sharded
through `model.safetensors.index.json` or a single `model.safetensors`) into the variables of
`Transformer(cfg)`; `save` writes the release layout back (per-expert names, the MTP module at
layer `num_hidden_layers`), which `transformers.DeepseekV3ForCausalLM.from_pretrained` loads.

Usage:
    cfg, variables = load("/ckpt/DeepSeek-V3", dtype="float32")
    logits = Transformer(cfg).apply(variables, tokens)
    save(cfg, variables, "/tmp/out")

The safetensors files are read and written by a small reader here rather than the `safetensors`
package: its numpy backend rejects BF16 and F8_E4M3, the dtypes of the release. Tensors are read
one at a time into preallocated stacked arrays, so peak host memory is the model plus the largest
tensor. FP8 weights are dequantised with their `weight_scale_inv` block scales (`dequantize_fp8`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from flax.linen import meta

from r1jax.config import ModelConfig
from r1jax.layers.common import dtype_of
from r1jax.model import Transformer

# safetensors dtype names <-> numpy dtypes (ml_dtypes supplies the bfloat16 and float8 types).
_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --------------------------------------------------------------------------- safetensors I/O
class _Shard:
  """Header of one safetensors file; tensors are read on demand with seek + read."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError(f"header of {n} bytes exceeds the file")
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      self.start = 8 + n
      self.tensors = {
        k: (v["dtype"], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()
      }
      end = max((off[1] for _, _, off in self.tensors.values()), default=0)
      if self.start + end > size:
        raise ValueError(f"data ends at byte {self.start + end} but the file has {size}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
      raise ValueError(
        f"{path}: unreadable or truncated safetensors file ({e}); re-download it"
      ) from None

  def read(self, name: str) -> np.ndarray:
    dtype, shape, (begin, end) = self.tensors[name]
    np_dtype = _DTYPES[dtype]
    with open(self.path, "rb") as f:
      f.seek(self.start + begin)
      data = f.read(end - begin)
    if len(data) != math.prod(shape) * np_dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name} is truncated; re-download the file")
    return np.frombuffer(data, np_dtype).reshape(shape)


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes `tensors` in the safetensors format (8-byte aligned header, `format: pt`)."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, a in tensors.items():
    header[name] = {
      "dtype": _DTYPE_NAMES[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + a.nbytes],
    }
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a).tobytes())


def _open_checkpoint(path: str) -> dict[str, _Shard]:
  """Tensor name -> the shard holding it, via the index when there is one."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    shards = {file: _Shard(os.path.join(path, file)) for file in sorted(set(weight_map.values()))}
    return {name: shards[file] for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise ValueError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}; point load() at a checkpoint dir")
  shard = _Shard(single)
  return {name: shard for name in shard.tensors}


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


def _check_tensors(entries: list[_Entry], tensors: dict[str, _Shard]) -> None:
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


def _abstract_variables(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened (collection, *path) -> shape/dtype of Transformer(cfg).init, nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t), tokens)
  variables = {k: v for k, v in variables.items() if k in ("params", "router_bias")}
  flat = traverse_util.flatten_dict(variables)
  return {k: (v.value if hasattr(v, "value") else v) for k, v in flat.items()}


def _read(tensors: dict[str, _Shard], name: str) -> np.ndarray:
  w = tensors[name].read(name)
  if w.dtype == _FP8:
    return dequantize_fp8(w, tensors[name + "_scale_inv"].read(name + "_scale_inv"))
  return w


def _allocate(cfg: ModelConfig) -> dict[tuple[str, ...], np.ndarray]:
  """Empty host arrays for every leaf: router bias in float32 (SPEC 7.2), params in param_dtype."""
  arrays = {}
  for key, leaf in _abstract_variables(cfg).items():
    leaf_dtype = np.float32 if key[0] == "router_bias" else dtype_of(cfg.param_dtype)
    arrays[key] = _aligned_empty(leaf.shape, leaf_dtype)
  return arrays


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty on a 64-byte boundary: jax then adopts the buffer on CPU instead of copying it
  (measured on the small preset: load's peak host memory fell from ~2.1x to ~1x the model)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buffer = np.empty(nbytes + align, np.uint8)
  offset = (-buffer.ctypes.data) % align
  return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _fill(arrays, entries: list[_Entry], tensors: dict[str, _Shard], progress=None) -> None:
  """Reads the tensors one by one into their slots; every leaf must be covered."""
  filled = set()
  for i, e in enumerate(entries):
    if progress is not None:
      progress(i, len(entries), e.name)
    target = arrays[(e.collection,) + e.path]
    w = _read(tensors, e.name)
    target[e.index] = (w.T if e.transpose else w).reshape(target[e.index].shape)
    filled.add((e.collection,) + e.path)
  unfilled = sorted("/".join(k) for k in set(arrays) - filled)
  if unfilled:
    raise ValueError(f"{unfilled[0]}: no checkpoint tensor maps to this r1jax leaf (loader bug)")


def load(
  path: str,
  *,
  dtype: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  progress: Callable[[int, int, str], None] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a DeepSeek V2/V3/R1 HF checkpoint directory.

  Args:
    path: directory with `config.json` and the safetensors (sharded with an index, or single).
    dtype: overrides the compute dtype of the config (e.g. "float32"). Params are held in
      `cfg.param_dtype`; the router correction bias in float32.
    mesh: accepted for the future parallel loader and ignored for now: arrays land on the default
      device (sharding on load comes with the parallelism issue).
    progress: called as progress(i, n, tensor_name) before each of the n tensors is read.

  Returns:
    (cfg, variables) with variables = {"params": ..., "router_bias": ...} (router_bias only for
    noaux_tc configs), ready for `Transformer(cfg).apply(variables, tokens)`. A checkpoint without
    MTP tensors (as transformers' save_pretrained writes) loads with num_nextn_predict_layers=0.

  Raises:
    ValueError: one line naming the field, tensor or file, before any tensor is read.
  """
  del mesh  # see Args
  cfg = _read_config(path, dtype)
  tensors = _open_checkpoint(path)
  mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
  if cfg.num_nextn_predict_layers and not any(n.startswith(mtp_prefix) for n in tensors):
    cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
  entries = _entries(cfg)
  _check_tensors(entries, tensors)
  arrays = _allocate(cfg)
  _fill(arrays, entries, tensors, progress)
  flat = {k: jnp.asarray(arrays.pop(k)) for k in list(arrays)}  # one host copy at a time
  return cfg, traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------- save
def _hf_tensors(cfg: ModelConfig, variables: dict[str, Any]):
  """Yields (HF name, numpy array) in release order, duplicating embed/head into MTP layers."""
  flat = traverse_util.flatten_dict(_unboxed(variables))
  for e in _entries(cfg):
    slot = np.asarray(flat[(e.collection,) + e.path])[e.index]
    yield e.name, (slot.reshape(e.shape[::-1]).T if e.transpose else slot.reshape(e.shape))
    if e.name.endswith("eh_proj.weight"):
      # release checkpoints carry copies of the shared embedding and head in each MTP layer
      p = e.name[: -len("eh_proj.weight")]
      yield p + "embed_tokens.weight", np.asarray(flat[("params", "embed")])
      head = np.asarray(flat[("params", "embed")])
      if not cfg.tie_word_embeddings:
        head = np.asarray(flat[("params", "lm_head")]).T
      yield p + "shared_head.head.weight", head


def _unboxed(variables: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in meta.unbox(dict(variables)).items() if k in ("params", "router_bias")}


def save(
  cfg: ModelConfig, variables: dict[str, Any], path: str, *, max_shard_bytes: int = 5 * 2**30
) -> str:
  """Writes `variables` as an HF checkpoint directory in the release layout.

  Files: `config.json` (cfg.to_hf_config()), `model-0000i-of-0000n.safetensors` shards of at most
  `max_shard_bytes` (a larger single tensor gets a shard of its own) and
  `model.safetensors.index.json`. Tensors keep their dtype, so `load(save(...))` is bit-identical.

  Returns:
    path.
  """
  if not cfg.scan_layers:
    raise ValueError("scan_layers: save() expects stacked layers; use scan_layers=True")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf_config(), f, indent=2)
  # Each shard is written as soon as it is full, so at most one shard's worth of converted
  # tensors is held beside the model; the final names need the shard count, hence the rename.
  shard: dict[str, np.ndarray] = {}
  written: list[tuple[str, list[str]]] = []
  total = 0

  def flush():
    temp = os.path.join(path, f".shard-{len(written) + 1:05d}.tmp")
    _write_safetensors(temp, shard)
    written.append((temp, list(shard)))
    shard.clear()

  for name, a in _hf_tensors(cfg, variables):
    a = np.ascontiguousarray(a)
    if shard and sum(x.nbytes for x in shard.values()) + a.nbytes > max_shard_bytes:
      flush()
    shard[name] = a
    total += a.nbytes
  if shard:
    flush()
  weight_map = {}
  for i, (temp, names) in enumerate(written, start=1):
    file = f"model-{i:05d}-of-{len(written):05d}.safetensors"
    os.replace(temp, os.path.join(path, file))
    weight_map.update(dict.fromkeys(names, file))
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
  return path


if __name__ == "__main__":
  import sys

  from r1jax.hf_convert import main

  sys.exit(main())
