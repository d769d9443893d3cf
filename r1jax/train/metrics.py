"""Run metrics: JSONL and TensorBoard files, throughput, and an MFU estimate.

MFU = tokens/s x model FLOPs per token / (devices x peak FLOP/s of one device).
  model FLOPs per token (training, forward + backward) = 6 N + 6 L H s (d_qk + d_v) / 2
    N  parameters one token is computed with, without the input embedding (routed experts count
       K of E; MTP modules included when trained), L attention layers (MTP included), H heads,
       s sequence length; the causal attention scores and values are counted at half the
       square (PaLM's appendix B convention, adapted to MLA's head dims).
  peak: a table for TPU and GPU chips (bf16 dense, vendor figures); on CPU, measured once per
       process with a float32 matmul.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig
from r1jax.sizing import active_param_count
from r1jax.train import paths

# bf16 dense peak FLOP/s per chip (vendor figures), matched against jax's device_kind.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
}


def model_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool) -> float:
  """Training FLOPs per token (module docstring)."""
  n = active_param_count(cfg, include_mtp=include_mtp, include_embedding=False)
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
  attention = 6 * layers * cfg.num_attention_heads * seq_len * (cfg.qk_head_dim + cfg.v_head_dim)
  return 6 * n + attention / 2


@functools.cache
def device_peak_flops() -> float:
  """Peak FLOP/s of one device: the table for accelerators, a measured matmul on CPU."""
  device = jax.devices()[0]
  for kind, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(kind):
      return peak
  if device.platform != "cpu":
    return float("nan")  # unknown chip: MFU is reported as NaN rather than guessed
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


class MetricsWriter:
  """Appends each logged row to WORKDIR/metrics.jsonl and to TensorBoard event files.

  Only process 0 writes. Arrays (e.g. per-layer expert load) go to the JSONL file as lists and
  to TensorBoard as one scalar per element. On an object store (gs://) the JSONL rows are
  batched: written every `remote_flush_s` seconds and at `flush` / `close` (the trainer flushes
  with every checkpoint), as each write rewrites the object.
  """

  def __init__(self, workdir: str | None, remote_flush_s: float = 60.0):
    """workdir None: nothing is written (a run without a run directory)."""
    self.active = jax.process_index() == 0 and workdir is not None
    self.path = paths.join(workdir, "metrics.jsonl") if workdir else None
    self._remote = bool(workdir) and paths.is_remote(workdir)
    self._pending: list[str] = []
    self._flush_s, self._flushed = remote_flush_s, time.monotonic()
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, row: dict[str, Any]) -> None:
    if not self.active:
      return
    plain = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in row.items()}
    plain["step"] = int(row["step"])
    self._pending.append(json.dumps(plain) + "\n")
    if not self._remote or time.monotonic() - self._flushed > self._flush_s:
      self.flush()
    for name, value in plain.items():
      if name == "step":
        continue
      if isinstance(value, list):
        for i, v in enumerate(np.ravel(value)):
          self._tb.add_scalar(f"{name}/{i}", v, plain["step"])
      else:
        self._tb.add_scalar(name, value, plain["step"])

  def flush(self) -> None:
    if self.active and self._pending:
      paths.append_lines(self.path, self._pending)
      self._pending = []
    self._flushed = time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
