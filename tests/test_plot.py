"""experiments.plot turns metrics.jsonl into PNGs; the metrics writer feeds it and TensorBoard."""

import json
import os

import numpy as np
import pytest

from experiments import plot
from r1jax.config import ModelConfig
from r1jax.sizing import active_param_count
from r1jax.train.metrics import MetricsWriter, model_flops_per_token


def test_writer_and_plots(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  for step in range(0, 50, 10):
    writer.write(
      {
        "step": step,
        "loss": np.float32(5.0 / (step + 1)),
        "lm_loss": 4.0 / (step + 1),
        "mtp_loss": 4.5 / (step + 1),
        "load_max_mean": 2.0 - step / 50,
        "load_cv": 0.5,
        "load_max_mean_layers": np.array([2.0 - step / 50, 1.5]),
        **({"tokens_per_s": 1000.0, "mfu": 0.2} if step else {}),
      }
    )
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert np.allclose(rows[1]["load_max_mean_layers"], [1.8, 1.5])
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
  written = plot.write_plots(str(tmp_path))
  assert [os.path.basename(p) for p in written] == ["loss.png", "expert_load.png", "throughput.png"]
  for path in written:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_missing_metrics_file(tmp_path):
  with pytest.raises(ValueError, match="--workdir: .*metrics.jsonl not found"):
    plot.write_plots(str(tmp_path))


def test_flops_per_token_is_six_n_plus_attention():
  cfg = ModelConfig.from_preset("v3_671b")
  n = active_param_count(cfg, include_embedding=False)
  attention = 6 * 61 * 128 * 4096 * (192 + 128) / 2
  assert model_flops_per_token(cfg, 4096, include_mtp=False) == 6 * n + attention
