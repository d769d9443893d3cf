"""Built-in synthetic task for the quickstart: carry-chain addition as byte tokens.

Each row is `a+b=c\n` in ASCII (a, b with 1..digits digits), packed back to back until the
sequence is full; a byte vocabulary (256) matches the `tiny` preset. Deterministic in the key.
"""

from __future__ import annotations

import numpy as np


def addition_text(rng: np.random.Generator, digits: int) -> str:
  a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, digits + 1)))) for _ in range(2))
  return f"{a}+{b}={a + b}\n"


def addition_batch(seed: int, step: int, batch: int, seq_len: int, digits: int = 3) -> np.ndarray:
  """int32 [batch, seq_len] byte tokens; the same (seed, step) always gives the same batch."""
  rng = np.random.default_rng([seed, step])
  rows = np.zeros((batch, seq_len), np.int32)
  for i in range(batch):
    text = ""
    while len(text) < seq_len:
      text += addition_text(rng, digits)
    rows[i] = np.frombuffer(text[:seq_len].encode("ascii"), np.uint8)
  return rows
