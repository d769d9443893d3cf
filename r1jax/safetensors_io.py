"""safetensors files read and written tensor by tensor (the format of HF checkpoints).

A small reader/writer rather than the `safetensors` package: its numpy backend rejects BF16 and
F8_E4M3, the dtypes of the DeepSeek release, and it writes a file from tensors already in
memory, where `stream_safetensors` lays out the header from shapes alone and then produces and
writes the tensors one at a time.

Format: 8-byte little-endian header size, a JSON header (name -> dtype, shape, data_offsets)
padded with spaces to 8-byte alignment, then the raw little-endian data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One tensor to write: its HF name, shape and dtype, and how to produce its values."""

  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]


# safetensors dtype names <-> numpy dtypes (ml_dtypes supplies the bfloat16 and float8 types).
DTYPES = {
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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --------------------------------------------------------------------------- safetensors I/O
class Shard:
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
    np_dtype = DTYPES[dtype]
    with open(self.path, "rb") as f:
      f.seek(self.start + begin)
      data = f.read(end - begin)
    if len(data) != math.prod(shape) * np_dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {name} is truncated; re-download the file")
    return np.frombuffer(data, np_dtype).reshape(shape)


def stream_safetensors(f, tensors: list[TensorSpec]):
  """Writes the safetensors header for `tensors`, then each tensor's bytes as it is produced.

  Yields each tensor after writing it (for progress). Format: 8-byte little-endian header size,
  JSON header padded with spaces to 8-byte alignment, `format: pt`, then the data.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in tensors:
    nbytes = math.prod(t.shape) * t.dtype.itemsize
    header[t.name] = {
      "dtype": DTYPE_NAMES[t.dtype],
      "shape": list(t.shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  f.write(struct.pack("<Q", len(blob)) + blob)
  for t in tensors:
    a = np.ascontiguousarray(t.produce(), dtype=t.dtype)
    if a.shape != t.shape:
      raise ValueError(f"{t.name}: produced shape {a.shape}, header says {t.shape} (writer bug)")
    f.write(a.reshape(-1).view(np.uint8).data)  # a uint8 view: buffers reject bf16/fp8
    yield t


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes in-memory `tensors` as one safetensors file (used by the tests' fixtures)."""
  outs = [
    TensorSpec(n, a.shape, a.dtype, functools.partial(lambda a: a, a)) for n, a in tensors.items()
  ]
  with open(path, "wb") as f:
    for _ in stream_safetensors(f, outs):
      pass


def open_checkpoint(path: str) -> dict[str, Shard]:
  """Tensor name -> the shard holding it, via the index when there is one."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    shards = {file: Shard(os.path.join(path, file)) for file in sorted(set(weight_map.values()))}
    return {name: shards[file] for name, file in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise ValueError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE}; point load() at a checkpoint dir")
  shard = Shard(single)
  return {name: shard for name in shard.tensors}
