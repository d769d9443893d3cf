"""One step of each training experiment through the library call its main makes (trainer.run on
a data pipeline), and SFT's prompt masking checked against the loss computed by hand."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig
from r1jax.data.pipeline import DataConfig, make_pipeline
from r1jax.model import Transformer
from r1jax.train import trainer
from r1jax.train.loop import TrainConfig
from r1jax.train.step import loss_fn, make_init

TINY = ModelConfig.from_preset("tiny", dtype="float32")
TRAIN = TrainConfig(num_steps=1, batch_size=2, seq_len=32, log_every=1)


def _one_step(workdir, data_cfg, train=TRAIN, model_cfg=TINY):
  """What experiments/train_main.py does after its checks: the run record, then the run."""
  trainer.write_run_record(str(workdir), "--preset=tiny\n", model_cfg, train, None, data_cfg)
  data = make_pipeline(data_cfg, vocab_size=model_cfg.vocab_size)
  result = trainer.run(
    model_cfg, train, trainer.RunConfig(str(workdir), save_every=1), data=data, log=lambda _: None
  )
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return result, rows


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_pretrain_one_step(tmp_path, source):
  files = ()
  if source == "text":
    (tmp_path / "a.txt").write_text("The quick brown fox.\n\nJumps over the lazy dog.\n")
    files = (str(tmp_path / "a.txt"),)
  data_cfg = DataConfig(
    source=source, data_files=files, text_unit="paragraph", seq_len=32, batch_size=2
  )
  result, rows = _one_step(tmp_path / "run", data_cfg)
  assert result["status"] == "done" and result["step"] == 1
  assert [r["step"] for r in rows] == [0] and np.isfinite(rows[0]["loss"])
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]


def test_pretrain_flags_turn_on_local_attention_and_token_merging(tmp_path):
  """--attention_windows and --merge_* values become the ModelConfig fields (layers unrolled;
  tests/test_experiments.py passes bad ones through the flags), and that model trains a step,
  packed documents and all."""
  from r1jax.config import variant_overrides

  overrides = variant_overrides(["0", "8", "0"], 0.25, 1, 3, 0.9)  # the flags' values
  assert overrides == dict(
    attention_windows=(0, 8, 0),
    merge_ratio=0.25,
    merge_layer=1,
    inflate_layer=3,
    merge_threshold=0.9,
    scan_layers=False,
  )
  cfg = ModelConfig.from_preset("tiny", dtype="float32", **overrides)
  data_cfg = DataConfig(source="synthetic", seq_len=32, batch_size=2)
  result, rows = _one_step(tmp_path / "run", data_cfg, model_cfg=cfg)
  assert result["status"] == "done" and np.isfinite(rows[0]["loss"])


def test_sft_one_step_counts_only_the_response(tmp_path):
  pairs = [("What is 2+3? ", "5"), ("Name a colour: ", "blue"), ("1+1=", "2")] * 4
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
  data_cfg = DataConfig(source="sft", data_files=(str(path),), seq_len=32, batch_size=2, seed=3)
  result, rows = _one_step(tmp_path / "run", data_cfg)
  assert result["status"] == "done"
  # The step-0 loss by hand: the same init, the same first batch, only the response targets.
  batch = next(make_pipeline(data_cfg, vocab_size=TINY.vocab_size))
  model = Transformer(TINY)
  state = make_init(model, trainer.make_optimizer(TRAIN))(
    jax.random.key(TRAIN.seed), jnp.zeros((2, 32), jnp.int32)
  )
  args = [jnp.asarray(batch[k]) for k in ("tokens", "targets")]
  loss = jax.jit(
    lambda mask: loss_fn(  # noqa: E731
      state.params,
      state.router_bias,
      model,
      args[0],
      mask,
      TRAIN.loss_config(),
      jnp.asarray(batch["positions"]),
      jnp.asarray(batch["segment_ids"]),
    )[1][0]["lm_loss"]
  )
  assert rows[0]["lm_loss"] == pytest.approx(float(loss(args[1])), rel=1e-5)
  assert batch["targets"].sum() < (batch["segment_ids"] > 0).sum()  # prompts are in the batch
  unmasked = float(loss((jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.int32)))
  assert rows[0]["lm_loss"] != pytest.approx(unmasked, rel=1e-3)


def test_init_from_an_earlier_run_takes_its_newest_weights(tmp_path):
  from r1jax.checkpoint import load_weights, read_config

  run = tmp_path / "run"
  _one_step(
    run, DataConfig(seq_len=32, batch_size=2), TrainConfig(**{**vars(TRAIN), "num_steps": 2})
  )
  cfg, variables = load_weights(str(run))
  assert cfg == TINY
  # The same state through the trainer's own restore (orbax's manager, a typed target).
  model = Transformer(TINY)
  init = make_init(model, trainer.make_optimizer(TRAIN))(
    jax.random.key(TRAIN.seed), jnp.zeros((2, 32), jnp.int32)
  )
  checkpoints = trainer.TrainCheckpoints(str(run), save_every=1, keep=3, log=print)
  step, state, _ = checkpoints.restore_latest(init)
  checkpoints.close()
  assert step == 2  # the newest (step 1 is kept too)
  loaded, restored = jax.tree.leaves(variables["params"]), jax.tree.leaves(state.params)
  for a, b in zip(loaded, restored, strict=True):
    np.testing.assert_array_equal(a, b)
  fresh = jax.tree.leaves(init.params)
  assert any(not np.array_equal(a, c) for a, c in zip(loaded, fresh, strict=True))  # trained
  assert read_config(str(run)) == TINY
