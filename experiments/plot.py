"""Plots of a run's metrics.jsonl: loss curves and a per-layer expert-load heat map over time.

  python -m experiments.plot --workdir=/tmp/r1jax_tiny      # writes WORKDIR/plots/*.png

loss.png: total, LM and MTP loss against the step (log scale). expert_load.png: for each MoE
layer (rows) and logged step (columns), max/mean expert load (1 = balanced), with the worst
layer's value and the mean coefficient of variation beneath. throughput.png: tokens/s and MFU.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory holding metrics.jsonl.")


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"--workdir: {path} not found; point at a run directory")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f"--workdir: {path} is empty; the run has not logged a step yet")
  return rows


def _series(rows, key):
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_losses(rows, path: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in ("loss", "lm_loss", "mtp_loss"):
    steps, values = _series(rows, key)
    if steps:
      ax.plot(steps, values, label=key)
  ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_expert_load(rows, path: str) -> bool:
  steps, layers = _series(rows, "load_max_mean_layers")
  if not steps:
    return False
  grid = np.asarray(layers, dtype=float).T  # [layers, logged steps]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), height_ratios=(2, 1), sharex=True)
  image = top.imshow(
    grid,
    aspect="auto",
    origin="lower",
    cmap="magma",
    extent=(steps[0], steps[-1], -0.5, grid.shape[0] - 0.5),
    vmin=1.0,
  )
  fig.colorbar(image, ax=top, label="max / mean expert load")
  top.set(ylabel="MoE layer", title="expert load per layer (1 = balanced)")
  for key in ("load_max_mean", "load_cv"):
    s, v = _series(rows, key)
    bottom.plot(s, v, label=key)
  bottom.axhline(1.3, color="gray", linestyle=":", linewidth=1)
  bottom.set(xlabel="step")
  bottom.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_throughput(rows, path: str) -> bool:
  steps, tokens = _series(rows, "tokens_per_s")
  if not steps:
    return False
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.plot(steps, tokens, color="tab:blue")
  ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
  s, mfu = _series(rows, "mfu")
  if s:
    twin = ax.twinx()
    twin.plot(s, np.asarray(mfu) * 100, color="tab:orange")
    twin.set_ylabel("MFU %")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_plots(workdir: str) -> list[str]:
  rows = read_metrics(workdir)
  out = os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, "loss.png")]
  plot_losses(rows, written[0])
  for name, fn in (("expert_load.png", plot_expert_load), ("throughput.png", plot_throughput)):
    if fn(rows, os.path.join(out, name)):
      written.append(os.path.join(out, name))
  return written


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  if not FLAGS.workdir:
    exit_on_bad_input("--workdir: required; the run directory to plot")
  try:
    written = write_plots(FLAGS.workdir)
  except ValueError as err:
    exit_on_bad_input(str(err))
  for path in written:
    print(path)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)
