"""Held-out metrics of a reasoning model, by RECIPE.md's convention.

For P problems with k samples each (temperature 0.6, top-p 0.95) and one greedy reply:
  pass@1        mean over problems of the fraction of its k samples that are correct
  pass@k        mean over problems of the unbiased estimator 1 - C(n - c, k) / C(n, k) (Chen et
                al. 2021) with n samples drawn and c correct; with k = n, "any sample correct"
  greedy_acc    fraction of problems whose greedy reply is correct
  format_rate   fraction of samples that are well formed
  think_rate    fraction of samples with a <think> block
  mean_length   mean generated tokens per sample (EOS included); also over the correct and the
                incorrect samples alone (nan when there are none)
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (k <= n)."""
  if not 0 < k <= n or not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct, well_formed, has_think, lengths, greedy_correct=None, k: int | None = None):
  """The metrics above from per-sample arrays [P, n] (bool, bool, bool, int) and the greedy
  replies' correctness [P]; pass@k for k (default n)."""
  correct = np.asarray(correct, bool)
  p, n = correct.shape
  k = n if k is None else k
  lengths = np.asarray(lengths, np.float64)
  counts = correct.sum(axis=1)
  out = {
    "pass@1": float(correct.mean()),
    "pass@k": float(np.mean([pass_at_k(n, int(c), k) for c in counts])),
    "format_rate": float(np.mean(well_formed)),
    "think_rate": float(np.mean(has_think)),
    "mean_length": float(lengths.mean()),
    "mean_length_correct": float(lengths[correct].mean()) if correct.any() else math.nan,
    "mean_length_incorrect": float(lengths[~correct].mean()) if (~correct).any() else math.nan,
  }
  if greedy_correct is not None:
    out["greedy_acc"] = float(np.mean(np.asarray(greedy_correct, bool)))
  return out
