"""Built-in synthetic task for the quickstart: carry-chain addition as byte tokens.

Each row is `a+b=c\n` in ASCII (a, b with 1..digits digits), packed back to back until the
sequence is full; a byte vocabulary (256) matches the `tiny` preset. Deterministic in the key.
`addition_documents` draws the same kind of problem one per document, for the synthetic source of
`r1jax.data.pipeline` (which packs them with segment ids, so that problems do not see each other).
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


def addition_documents(seed: int, block: int, count: int, digits: int = 3) -> list[str]:
  """`count` documents `a+b=c\\n` (one problem each), the same for the same (seed, block).

  The pipeline's synthetic source reads document i from block i // count; drawing a block at once
  is ~50x cheaper than one generator per document.
  """
  rng = np.random.default_rng([seed, block, 1])  # The trailing 1 keeps these apart from batches.
  sizes = 10 ** rng.integers(1, digits + 1, size=(count, 2))
  values = rng.integers(0, sizes)
  return [f"{a}+{b}={a + b}\n" for a, b in values.tolist()]
