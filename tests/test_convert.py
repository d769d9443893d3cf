"""HF checkpoint <-> r1jax weights directory, the convert CLI, and --init_from in an experiment."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from r1jax import checkpoint, hf, safetensors_io
from r1jax.data.pipeline import DataConfig, make_pipeline
from r1jax.hf_convert import convert
from r1jax.model import Transformer
from r1jax.train.step import LossConfig, loss_fn
from tests.hf_fixtures import hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf"))
  hf_model("a_qlora_yarn").save_pretrained(path)
  return path


def _assert_identical(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))
    assert np.asarray(fa[key]).dtype == np.asarray(fb[key]).dtype, key


def test_convert_both_ways_is_bit_identical(hf_dir, tmp_path):
  cfg, variables = hf.load(hf_dir)
  convert(hf_dir, str(tmp_path / "r1"), show_progress=False)
  cfg2, restored = checkpoint.load_weights(str(tmp_path / "r1"))
  assert cfg2 == cfg
  _assert_identical(restored, variables)
  convert(str(tmp_path / "r1"), str(tmp_path / "back"))
  cfg3, again = hf.load(str(tmp_path / "back"))
  assert cfg3 == cfg
  _assert_identical(again, variables)


def test_bf16_checkpoint_converts_both_ways_keeping_bf16(hf_dir, tmp_path):
  """The release stores bf16: HF -> r1jax -> HF keeps every tensor's bytes and dtype."""
  src = tmp_path / "bf16"
  src.mkdir()
  cfg, variables = hf.load(hf_dir, param_dtype="bfloat16")
  hf.save(cfg, variables, str(src))
  convert(str(src), str(tmp_path / "r1"), show_progress=False)
  assert checkpoint.load_weights(str(tmp_path / "r1"))[0].param_dtype == "bfloat16"
  convert(str(tmp_path / "r1"), str(tmp_path / "back"), show_progress=False)
  a, b = (
    safetensors_io.open_checkpoint(str(src)),
    safetensors_io.open_checkpoint(str(tmp_path / "back")),
  )
  assert a.keys() == b.keys()
  for name in a:
    x, y = a[name].read(name), b[name].read(name)
    assert x.dtype == y.dtype, name
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)
  assert {a[n].read(n).dtype.name for n in a} == {"bfloat16", "float32"}  # bias stays float32


def test_convert_refuses_a_model_larger_than_host_memory(hf_dir, tmp_path, monkeypatch):
  from r1jax import hf_convert

  monkeypatch.setattr(hf_convert, "_available_host_bytes", lambda: 1000)
  with pytest.raises(ValueError, match=r"SRC: the params take .* GiB in float32 but this host"):
    convert(hf_dir, str(tmp_path / "r1"), show_progress=False)
  assert not (tmp_path / "r1").exists()


def _run(*args, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def test_convert_cli_refuses_bad_input_without_writing(hf_dir, tmp_path):
  proc = _run("r1jax.hf", "convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error: SRC:"), proc.stderr
  assert not (tmp_path / "out").exists()
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("trained")
  proc = _run("r1jax.hf", "convert", hf_dir, str(busy))
  assert proc.returncode == 2 and "DST:" in proc.stderr, proc.stderr
  assert os.listdir(busy) == ["keep.txt"] and (busy / "keep.txt").read_text() == "trained"


@pytest.mark.slow  # end to end; CI's fast suite must stay well inside its time
def test_converted_weights_are_loaded_by_pretrain_init_from(hf_dir, tmp_path):
  """The CLI converts, then the experiment starts from those weights: its step-0 loss is the
  loss of the HF model's weights on the first batch."""
  out = str(tmp_path / "weights")
  proc = _run("r1jax.hf", "convert", hf_dir, out)
  assert proc.returncode == 0, proc.stderr
  assert "tensors" not in proc.stdout and re.search(r"\d+/\d+", proc.stderr)  # progress bar
  proc = _run(
    "experiments.pretrain",
    f"--init_from={out}",
    "--num_steps=2",
    "--batch_size=2",
    "--seq_len=16",
    "--log_every=1",
  )
  assert proc.returncode == 0, proc.stderr
  first = re.search(r"step\s+0/2\s+loss (\d+\.\d+)", proc.stdout)
  assert first, proc.stdout
  cfg, variables = hf.load(hf_dir)
  # The experiment's first batch: the synthetic source of the data pipeline, packed.
  batch = next(make_pipeline(DataConfig(seq_len=16, batch_size=2), vocab_size=cfg.vocab_size))
  want, _ = jax.jit(
    lambda v, b: loss_fn(
      v["params"],
      v["router_bias"],
      Transformer(cfg),
      b["tokens"],
      b["targets"],
      LossConfig(),
      b["positions"],
      b["segment_ids"],
    )
  )(variables, {k: jnp.asarray(v) for k, v in batch.items()})
  assert float(first.group(1)) == pytest.approx(float(want), abs=1e-4)


def test_weights_with_a_wrong_shape_are_named(hf_dir, tmp_path):
  cfg, variables = hf.load(hf_dir)
  variables["params"]["embed"] = variables["params"]["embed"][:, :-1]
  checkpoint.save_weights(str(tmp_path / "bad"), cfg, variables)
  with pytest.raises(
    ValueError, match=r"tensor params/embed has shape \[128, 31\], the config needs \[128, 32\]"
  ):
    checkpoint.load_weights(str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="not an r1jax weights directory"):
    checkpoint.load_weights(str(tmp_path))
