"""`python -m r1jax.hf convert SRC DST [--dtype=...]`: HF checkpoint <-> r1jax weights directory.

The direction follows SRC: an HF directory (config.json + safetensors) becomes an r1jax weights
directory (orbax, what every experiment's --init_from reads); an r1jax weights directory becomes
an HF directory in the release layout. Bad input gets one line on stderr and exit code 2, before
anything is written; an existing destination is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

from r1jax import checkpoint, hf, sizing
from r1jax.config import DTYPES


def _progress_bar(stream=sys.stderr):
  """A progress(i, n, name) callback drawing `[####....] i/n name` on one line."""
  start = time.perf_counter()

  def progress(i: int, n: int, name: str) -> None:
    done = int(30 * (i + 1) / n)
    elapsed = time.perf_counter() - start
    stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i + 1}/{n} {elapsed:5.1f}s {name[:60]:<60}")
    if i + 1 == n:
      stream.write("\n")
    stream.flush()

  return progress


def _cast(variables, dtype: str | None):
  """Params to `dtype` (the router bias stays float32, as in the release)."""
  if dtype is None:
    return variables
  return {**variables, "params": jax.tree.map(lambda a: jnp.asarray(a, dtype), variables["params"])}


def _available_host_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None where there is no such file)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _check_host_memory(cfg) -> None:
  """Refuses a conversion whose params cannot fit in this host's memory, before reading any."""
  need = sizing.param_count(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
  need *= jnp.dtype(cfg.param_dtype).itemsize
  have = _available_host_bytes()
  if have is not None and need > have:
    raise ValueError(
      f"SRC: the params take {need / 2**30:.1f} GiB in {cfg.param_dtype} but this host has "
      f"{have / 2**30:.1f} GiB available; convert on a larger host, or skip conversion and "
      "load the HF directory onto the accelerators with r1jax.hf.load(path, mesh=...)"
    )


def convert(src: str, dst: str, dtype: str | None = None, show_progress: bool = True) -> str:
  """Converts in the direction SRC's contents say; returns a one-line summary."""
  if os.path.exists(dst) and os.listdir(dst):
    raise ValueError(f"DST: {dst} exists and is not empty; choose a new directory")
  if checkpoint.is_weights_dir(src):
    cfg, variables = checkpoint.load_weights(src)
    if dtype:
      cfg = dataclasses.replace(cfg, param_dtype=dtype)
    hf.save(cfg, _cast(variables, dtype), dst, progress=_progress_bar() if show_progress else None)
    return f"wrote HF checkpoint {dst} ({cfg.num_hidden_layers} layers)"
  if not os.path.isfile(os.path.join(src, "config.json")):
    raise ValueError(
      f"SRC: {src} holds neither an HF checkpoint nor r1jax weights (no config.json)"
    )
  _check_host_memory(hf.read_config(src, param_dtype=dtype))
  progress = _progress_bar() if show_progress else None
  cfg, variables = hf.load(src, param_dtype=dtype, progress=progress)
  checkpoint.save_weights(dst, cfg, variables)
  return f"wrote r1jax weights {dst} (use --init_from={dst})"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m r1jax.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="HF checkpoint <-> r1jax weights directory")
  conv.add_argument("src")
  conv.add_argument("dst")
  conv.add_argument("--dtype", choices=DTYPES, default=None, help="store params in this dtype")
  args = parser.parse_args(argv)
  try:
    print(convert(args.src, args.dst, args.dtype))
  except ValueError as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
  return 0
