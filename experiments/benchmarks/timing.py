"""Alternating step timing shared by the benchmarks: every side sees the same background load."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_steps(
  steps: dict[str, Callable[[], object]], reps: int, warmup: int, pause_s: float = 0.0
) -> tuple[dict[str, float], dict[str, object]]:
  """Median seconds per step of each side and each side's first result.

  Every side runs `warmup` untimed steps first (the first one's result is returned); then `reps`
  rounds of one timed step per side. With several sides, `pause_s` of idle time goes before each
  timed step (runtimes keep worker threads spinning for a while after their work).
  """
  first = {}
  for name, step in steps.items():
    first[name] = step()
    for _ in range(warmup - 1):
      step()
  times = {name: [] for name in steps}
  for _ in range(reps):
    for name, step in steps.items():
      if pause_s and len(steps) > 1:
        time.sleep(pause_s)
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}, first
