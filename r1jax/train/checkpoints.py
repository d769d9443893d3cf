"""Training-state checkpoints: orbax CheckpointManager with async saves, keep-K, and fallbacks.

Layout: WORKDIR/checkpoints/<step>/{state, data} where `state` is the TrainState (params, router
bias, optimizer state, step) and `data` the data pipeline's position (JSON), saved together so a
restored run continues with exactly the batches an uninterrupted one would see.

Restoring tries the latest step first; a checkpoint that fails to restore (a torn or corrupted
write) is reported, renamed to `<step>.unreadable` (kept for inspection, never deleted), and the
one before it is tried, so one bad save never loses the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp

from r1jax.train import paths

CHECKPOINT_DIR = "checkpoints"


class TrainCheckpoints:
  """Saves every `save_every` steps (asynchronously), keeps the newest `keep`."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, log: Callable[[str], None]):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every, keep: must be >= 1, got {save_every}, {keep}")
    self.directory = paths.join(paths.resolve(workdir), CHECKPOINT_DIR)
    self._log = log
    self._save_every = save_every
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts an async save when `step` is a multiple of save_every (or `force`); returns
    whether one started. (Orbax's own interval also saves the first step; this does not.)"""
    if not force and step % self._save_every:
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    return self._manager.save(step, args=args, force=True)

  def restore_latest(self, target: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores; None if there is none.

    Args:
      target: a TrainState of arrays (or ShapeDtypeStructs with shardings) giving the structure,
        dtypes and shardings to restore into.
    """
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as err:  # noqa: BLE001 - any failure means "this one is unusable"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        aside = self._set_aside(step)
        self._log(
          f"checkpoint {step} in {self.directory} is unreadable ({first}); kept as {aside}, "
          "trying the one before"
        )
        continue
      return step, restored["state"], dict(restored["data"])
    return None

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step directory (never deletes it) so the run can save that step
    again; orbax then no longer lists it."""
    source = paths.join(self.directory, str(step))
    target, n = f"{source}.unreadable", 1
    while paths.exists(target):
      n += 1
      target = f"{source}.unreadable{n}"
    paths.rename(source, target)
    self._manager.reload()
    return target.rsplit("/", 1)[-1]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class NoCheckpoints:
  """TrainCheckpoints' interface for a run without a run directory: nothing is saved."""

  directory = "(no --workdir)"

  def steps(self) -> list[int]:
    return []

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    del step, state, data_state, force
    return False

  def restore_latest(self, target: Any) -> None:
    del target

  def wait(self) -> None:
    pass

  def close(self) -> None:
    pass
