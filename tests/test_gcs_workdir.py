"""A gs:// workdir: the run record, metrics, resume checks and the checkpoint directory go to
the bucket path unmangled. GCS is faked by an fsspec filesystem over a local directory (what
etils.epath, and so r1jax.train.paths, uses for gs://). Orbax's checkpoints on gs:// (its
google-cloud-storage client and tensorstore's GCS driver) need a real bucket: not exercised."""

import json
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from r1jax import ModelConfig
from r1jax.train import metrics, paths, trainer
from r1jax.train.loop import TrainConfig


class _FakeGCS(LocalFileSystem):
  """gs://bucket/key <-> ROOT/bucket/key."""

  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, finalize_on_close=False, **kwargs):
    del finalize_on_close  # gcsfs's option, which etils passes
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix) :]).rstrip("/")
    return super()._strip_protocol(path)

  def unstrip_protocol(self, name):
    return "gs://" + os.path.relpath(name, self.root)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  _FakeGCS.root = str(tmp_path / "gcs")
  os.makedirs(os.path.join(_FakeGCS.root, "bucket"))
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, _FakeGCS, clobber=True)
  from etils.epath import backend

  backend.fsspec_backend._get_filesystem.cache_clear()
  yield os.path.join(_FakeGCS.root, "bucket")
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_paths_keep_urls_and_append_by_rewriting(bucket):
  url = "gs://bucket/run"
  assert paths.resolve(url) == url and paths.join(url, "a", "b.txt") == "gs://bucket/run/a/b.txt"
  paths.makedirs(url)
  paths.append_lines(paths.join(url, "m.jsonl"), ["1\n"])
  paths.append_lines(paths.join(url, "m.jsonl"), ["2\n", "3\n"])
  assert open(os.path.join(bucket, "run", "m.jsonl")).read() == "1\n2\n3\n"
  assert paths.listdir(url) == ["m.jsonl"] and paths.isdir(url)


def test_run_record_metrics_and_resume_checks_on_a_bucket(bucket, monkeypatch):
  url = "gs://bucket/run"
  cfg = ModelConfig.from_preset("tiny")
  train_cfg = TrainConfig(num_steps=3)
  trainer.write_run_record(url, "# python -m experiments.pretrain\n", cfg, train_cfg, None)
  assert sorted(os.listdir(os.path.join(bucket, "run"))) == [
    "config.json",
    "flags.txt",
    "run_info.json",
  ]
  trainer.check_resume(url, cfg, train_cfg, None)  # the same configs: resumable
  with pytest.raises(ValueError, match="--workdir: gs://bucket/run holds a run made with"):
    trainer.check_resume(url, cfg, TrainConfig(num_steps=3, learning_rate=1.0), None)

  logdirs = []

  class _Board:  # tensorboardX writes gs:// itself (google-cloud-storage); record the logdir
    def __init__(self, logdir):
      logdirs.append(logdir)

    def add_scalar(self, *args):
      pass

    def close(self):
      pass

  monkeypatch.setattr("tensorboardX.SummaryWriter", _Board)
  writer = metrics.MetricsWriter(url, remote_flush_s=3600)
  for step in range(3):
    writer.write({"step": step, "loss": 1.0 / (step + 1)})
  local = os.path.join(bucket, "run", "metrics.jsonl")
  assert not os.path.exists(local)  # batched: one rewrite per flush, not per row
  writer.flush()
  writer.write({"step": 3, "loss": 0.2})
  writer.close()
  rows = [json.loads(line) for line in open(local)]
  assert [r["step"] for r in rows] == [0, 1, 2, 3] and logdirs == [f"{url}/tensorboard"]
  trainer._trim_metrics(f"{url}/metrics.jsonl", 2)
  assert [json.loads(line)["step"] for line in open(local)] == [0, 1]
