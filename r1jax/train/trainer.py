"""The training run behind the experiments: workdir, run record, checkpoints, resume, faults.

A run's workdir holds:
  flags.txt         a flagfile that replays the run (written by the experiment, process 0)
  config.json       the resolved ModelConfig and TrainConfig
  run_info.json     git revision and dirty bit, package versions, backend, devices, mesh
  metrics.jsonl     one JSON object per logged step: loss, lm_loss, mtp_loss, balance_loss,
                    grad_norm, tokens_per_s, mfu, expert load (worst max/mean, mean CV, per layer)
  tensorboard/      the same as TensorBoard event files
  checkpoints/      orbax: the train state and the data pipeline's state every --save_every steps

Starting with a workdir that holds checkpoints resumes from the newest readable one, and the
metrics of steps after it are dropped from metrics.jsonl (they are recomputed, identically on
CPU). SIGTERM (what Cloud TPU sends before preemption) saves at the next step boundary and
returns; a non-finite loss stops the run before anything is saved, naming the step, so the last
good checkpoint stays the newest. A finite data pipeline that runs out ends the run early (status
"data_exhausted"), saved.

Batches come from `r1jax.data.pipeline` (each process builds its own rows); the loss counts the
tokens the batch's `targets` mark (SFT: the response only) within their documents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from r1jax import sharding
from r1jax.config import ModelConfig
from r1jax.data.pipeline import DataConfig, DataIterator, make_pipeline
from r1jax.model import Transformer
from r1jax.train import paths
from r1jax.train.checkpoints import NoCheckpoints, TrainCheckpoints
from r1jax.train.loop import TrainConfig, check_fits, make_optimizer, make_schedule
from r1jax.train.metrics import MetricsWriter, device_peak_flops, model_flops_per_token
from r1jax.train.step import make_init, make_train_step

METRICS_FILE = "metrics.jsonl"


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the kept checkpoint."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Where a run lives and how often it saves.

  Attributes:
    workdir: the run's directory (created; an existing one with checkpoints is resumed); None
      runs without one (no checkpoints, no metrics files).
    save_every: checkpoint every this many steps (and always at the end).
    keep: checkpoints kept on disk.
  """

  workdir: str | None
  save_every: int = 100
  keep: int = 3

  def __post_init__(self):
    if self.workdir is not None and not self.workdir:
      raise ValueError("workdir: must be a directory path (or None)")
    if self.save_every < 1:
      raise ValueError(f"save_every: must be >= 1, got {self.save_every}")
    if self.keep < 1:
      raise ValueError(f"keep_checkpoints: must be >= 1, got {self.keep}")


def _git_revision() -> dict[str, Any]:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return {"git_revision": None, "git_dirty": None}
  return {"git_revision": rev or None, "git_dirty": bool(dirty) if rev else None}


def run_info(mesh) -> dict[str, Any]:
  """Versions, backend, devices and mesh: what replaying a run needs to match."""
  from importlib import metadata

  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return {
    **_git_revision(),
    "python": sys.version.split()[0],
    "versions": versions,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "process_count": jax.process_count(),
    "mesh": dict(mesh.shape) if mesh is not None else None,
  }


def write_run_record(
  workdir: str,
  flags_text: str,
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  mesh,
  data_cfg: DataConfig | None = None,
) -> None:
  """flags.txt, config.json and run_info.json, on process 0 (before step 0)."""
  if jax.process_index() != 0:
    return
  paths.makedirs(workdir)
  paths.write_text(paths.join(workdir, "flags.txt"), flags_text)
  configs = {
    "model": dataclasses.asdict(model_cfg),
    "train": dataclasses.asdict(train_cfg),
    "data": dataclasses.asdict(data_cfg) if data_cfg is not None else None,
  }
  paths.write_text(paths.join(workdir, "config.json"), json.dumps(configs, indent=2))
  paths.write_text(paths.join(workdir, "run_info.json"), json.dumps(run_info(mesh), indent=2))


def check_workdir(workdir: str) -> None:
  """A workdir is new, empty, or an r1jax run (resumed); anything else is left untouched.

  Raises:
    ValueError: one line naming --workdir.
  """
  if paths.isdir(workdir) and paths.listdir(workdir):
    if not paths.exists(paths.join(workdir, "flags.txt")):
      raise ValueError(
        f"--workdir: {workdir} is not empty and holds no r1jax run (no flags.txt); "
        "choose a new directory"
      )
  elif paths.exists(workdir) and not paths.isdir(workdir):
    raise ValueError(f"--workdir: {workdir} is a file; choose a directory")


# Fields a resumed run may change: how the same computation is implemented or logged, its length.
_RESUMABLE_CHANGES = {
  "model": {"moe_impl", "expert_exchange", "remat", "decode_cache"},
  "train": {"num_steps", "log_every"},
  "data": {"data_files", "tokenizer"},
}


def check_resume(
  workdir: str, model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig | None
) -> None:
  """Refuses to resume the run in `workdir` with different configs (its checkpoints would not
  restore, or would continue a different run): one line naming the fields. Nothing is touched.

  Raises:
    ValueError: a field other than those in `_RESUMABLE_CHANGES` differs from config.json.
  """
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    return
  stored = json.loads(paths.read_text(path))
  now = {
    "model": dataclasses.asdict(model_cfg),
    "train": dataclasses.asdict(train_cfg),
    "data": dataclasses.asdict(data_cfg) if data_cfg is not None else None,
  }
  changed = []
  for part, fields in now.items():
    before = stored.get(part)
    if fields is None or before is None:
      continue
    fields = json.loads(json.dumps(fields))  # tuples -> lists, as stored
    for name, value in fields.items():
      if name not in _RESUMABLE_CHANGES[part] and before.get(name, value) != value:
        changed.append(f"{name}={before.get(name)!r} (now {value!r})")
  if changed:
    raise ValueError(
      f"--workdir: {workdir} holds a run made with {', '.join(changed[:4])}"
      f"{' and more' if len(changed) > 4 else ''}; resume it with "
      f"--flagfile={paths.join(workdir, 'flags.txt')}, or use a new --workdir"
    )


def _trim_metrics(path: str, before_step: int) -> None:
  """Drops logged steps >= before_step (a resumed run logs them again)."""
  if not paths.exists(path):
    return
  lines = paths.read_text(path).splitlines(keepends=True)
  rows = [line for line in lines if line.strip() and json.loads(line)["step"] < before_step]
  paths.write_text(path, "".join(rows))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks at each step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Throughput:
  """tokens/s and MFU over the steps since the previous log (the first interval, which holds the
  compile, is not reported)."""

  def __init__(self, step: int, tokens_per_step: int, flops_per_token: float, peak: float):
    self.step, self.time = step, None
    self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    out = {}
    if self.time is not None and step > self.step:
      tokens_per_s = (step - self.step) * self.tokens_per_step / (now - self.time)
      out = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak}
    self.step, self.time = step, now
    return out


def _progress(step: int, total: int, start_step: int, started: float, row: dict) -> str:
  """`step     9/200  loss 2.4012  lm 1.9 ...  3.1 steps/s  eta 61s` (the rate includes the
  first step's compile until later steps outweigh it)."""
  done = step + 1 - start_step
  elapsed = time.perf_counter() - started
  rate = done / elapsed if elapsed > 0 else 0.0
  eta = (total - step - 1) / rate if rate > 0 else float("inf")
  return (
    f"step {step:5d}/{total}  loss {float(row['loss']):.4f}  lm {float(row['lm_loss']):.4f}  "
    f"mtp {float(row['mtp_loss']):.4f}  grad_norm {float(row['grad_norm']):.3f}  "
    f"{rate:.2f} steps/s  eta {eta:.0f}s"
  )


def default_data(train_cfg: TrainConfig) -> DataConfig:
  """The synthetic addition task cut into the run's batches."""
  return DataConfig(seq_len=train_cfg.seq_len, batch_size=train_cfg.batch_size, seed=train_cfg.seed)


def check_data_fits(data_cfg: DataConfig, train_cfg: TrainConfig) -> None:
  for name in ("seq_len", "batch_size"):
    if getattr(data_cfg, name) != getattr(train_cfg, name):
      raise ValueError(
        f"{name}: the data config has {getattr(data_cfg, name)}, the train config "
        f"{getattr(train_cfg, name)}; build both from the same flags"
      )


def global_data_state(data: DataIterator) -> dict[str, Any]:
  """The pipeline's state with the rows of every process merged (the same dict on each): what a
  restart with any process count restores from."""
  state = data.get_state()
  if jax.process_count() == 1:
    return state
  from jax.experimental import multihost_utils

  encoded = np.frombuffer(json.dumps(state["rows"]).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([encoded.size], np.int64)).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: encoded.size] = encoded
  everyone = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  rows: dict[str, Any] = {}
  for size, raw in zip(sizes, everyone, strict=True):
    rows.update(json.loads(raw[: int(size)].tobytes().decode()))
  return {**state, "rows": rows}


def run(
  model_cfg: ModelConfig,
  train_cfg: TrainConfig,
  run_cfg: RunConfig,
  *,
  data: DataIterator | None = None,
  mesh=None,
  rules: sharding.AxisRules | None = None,
  init_variables: dict[str, Any] | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains with checkpoints in `run_cfg.workdir`.

  Args:
    data: this process's pipeline (`make_pipeline` of a DataConfig with the run's seq_len and
      batch_size), fresh; None: the synthetic addition task (`default_data`).

  Returns:
    {"status": "done" | "preempted" | "data_exhausted", "step": steps completed,
     "history": logged rows}.

  Raises:
    NonFiniteLoss: the loss became non-finite (nothing is saved for that step).
  """
  check_fits(model_cfg, train_cfg)
  if data is None:
    data = make_pipeline(
      default_data(train_cfg),
      vocab_size=model_cfg.vocab_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  model = Transformer(model_cfg)
  optimizer = make_optimizer(train_cfg)
  rules = rules or sharding.RULES["ep_fsdp"]
  shape = (train_cfg.batch_size, train_cfg.seq_len)
  in_batch = sharding.batch_sharding(mesh, rules) if mesh is not None else None

  def global_array(local):
    if mesh is None:
      return jax.numpy.asarray(local)
    return jax.make_array_from_process_local_data(in_batch, local, shape)

  dummy = global_array(np.zeros((shape[0] // jax.process_count(), shape[1]), np.int32))
  state = make_init(model, optimizer, mesh, rules)(jax.random.key(train_cfg.seed), dummy)
  if init_variables is not None:
    state = state.replace(
      params=init_variables["params"], router_bias=init_variables.get("router_bias", {})
    )
  checkpoints: TrainCheckpoints | NoCheckpoints = NoCheckpoints()
  if run_cfg.workdir is not None:
    checkpoints = TrainCheckpoints(
      run_cfg.workdir, save_every=run_cfg.save_every, keep=run_cfg.keep, log=log
    )
  start = 0
  restored = checkpoints.restore_latest(state)
  if restored is not None:
    start, state, data_state = restored
    if data_state.get("next_step") != start or "pipeline" not in data_state:
      raise ValueError(f"{checkpoints.directory}/{start}: data state does not match the step")
    data.set_state(data_state["pipeline"])
    log(f"resumed from step {start} ({checkpoints.directory})")
    if jax.process_index() == 0:
      _trim_metrics(paths.join(run_cfg.workdir, METRICS_FILE), start)
  step_fn = make_train_step(model, optimizer, train_cfg.loss_config(), mesh, rules)
  writer = MetricsWriter(run_cfg.workdir)
  schedule = make_schedule(train_cfg)
  flops = model_flops_per_token(model_cfg, train_cfg.seq_len, train_cfg.mtp_weight > 0)
  throughput = _Throughput(
    start, train_cfg.batch_size * train_cfg.seq_len, flops, device_peak_flops() * jax.device_count()
  )
  history: list[dict[str, float]] = []
  started = time.perf_counter()
  status = "done"
  with _Preemption() as preemption:
    step = start
    while step < train_cfg.num_steps:
      try:
        local = next(data)
      except StopIteration:
        status = "data_exhausted"
        log(f"the data ran out after step {step}; saving and stopping")
        checkpoints.save(
          step, state, {"next_step": step, "pipeline": global_data_state(data)}, force=True
        )
        break
      batch = {k: global_array(local[k]) for k in ("tokens", "targets", "positions", "segment_ids")}
      new_state, metrics = step_fn(
        state, batch["tokens"], batch["targets"], batch["positions"], batch["segment_ids"]
      )
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        writer.flush()
        checkpoints.wait()
        kept = checkpoints.steps()
        raise NonFiniteLoss(
          f"step {step}: loss is {loss}; stopping. The last good checkpoint "
          f"({kept[-1] if kept else 'none'}) in {checkpoints.directory} is kept"
        )
      state, step = new_state, step + 1
      last = step == train_cfg.num_steps
      if (step - 1) % train_cfg.log_every == 0 or last:
        row = {"step": step - 1, **jax.tree.map(np.asarray, metrics)}
        row.update(throughput.update(step), learning_rate=float(schedule(step - 1)))
        writer.write(row)
        history.append({k: (v.tolist() if np.ndim(v) else float(v)) for k, v in row.items()})
        log(_progress(step - 1, train_cfg.num_steps, start, started, row))
      force = last or preemption.requested
      if force or step % run_cfg.save_every == 0:
        data_state = {"next_step": step, "pipeline": global_data_state(data)}
        writer.flush()  # metrics up to a checkpoint are never lost (gs:// batches them)
        checkpoints.save(step, state, data_state, force=force)
      if preemption.requested and not last:
        status = "preempted"
        log(f"SIGTERM: saved step {step}; exiting")
        break
  checkpoints.close()
  writer.close()
  return {"status": status, "step": step, "history": history}
