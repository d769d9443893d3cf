"""Sequence packing: token documents -> fixed-length rows with segment ids and positions.

A document is an int token array [n], or [2, n] for SFT: its tokens and, per token, 1 where the
token is a target the loss counts (the response) and 0 where it is not (the prompt).

Rows are dicts of int32 [s] arrays (s = seq_len):
- `tokens`: the token ids; padding holds `pad_id`.
- `targets`: 1 where the token is a target the loss counts: every real token of a 1-D document,
  the flagged tokens of an SFT document; 0 for padding.
- `segment_ids`: 1, 2, ... for the documents (or document pieces) in the row, in order; 0 marks
  padding. `r1jax.layers.mla.attention_mask` lets a query see a key only where the two segment ids
  are equal, so no token attends across documents (padding attends only to padding).
- `positions`: each piece's RoPE positions, restarting at 0 where it starts in the row; padding
  is 0. The mask is causal by position, so positions must rise within a segment, as they do.

`PackIterDataset` packs greedily, concatenate-then-split: documents go into the row back to back
and one that does not fit is split, its remainder opening the next row (as a new segment at
position 0: attention never crosses rows, so nothing is lost by restarting). No token is dropped
and only the stream's last row has padding. `unpacked_row` is the alternative, one document per
row, truncated to s and padded.

grain's own `ConcatThenSplitIterDataset` packs the same way but is not used: in grain 0.2.18 its
state holds tuples, which the JSON round trip of a checkpoint (grain's own checkpoint handler
included) turns into lists, and a restored iterator then silently skips a document.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions")


def _channels(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n], targets [n]) of a [n] or [2, n] document."""
  doc = np.asarray(doc, np.int32)
  if doc.ndim == 2:
    return doc[0], doc[1]
  return doc, np.ones_like(doc)


def unpacked_row(doc: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One document as a row: its first `seq_len` tokens (the rest is dropped), then padding."""
  tokens, targets = _channels(doc)
  n = min(len(tokens), seq_len)
  row = {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}
  row["tokens"][:] = pad_id
  row["tokens"][:n] = tokens[:n]
  row["targets"][:n] = targets[:n]
  row["segment_ids"][:n] = 1
  row["positions"][:n] = np.arange(n, dtype=np.int32)
  return row


class PackIterDataset(grain.IterDataset):
  """Packs a dataset of 1-D int token arrays into rows of `seq_len` (concatenate, then split).

  The iterator's state is the parent's state before the document in hand plus the offset of the
  next token to take from it: a small JSON-serialisable dict, restored exactly.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
    """`parent` yields int token arrays [n]; rows are `seq_len` long, padded with `pad_id`."""
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):
  """See `PackIterDataset`. Raises StopIteration once the parent is out and nothing is left."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._doc: tuple[np.ndarray, np.ndarray] | None = (
      None  # In hand (tokens, targets), partly used.
    )
    self._offset = 0  # Its next token to pack.
    # The parent's state before `_doc`; grain's iterators return a fresh dict from get_state.
    self._doc_state = parent.get_state()

  def _take_document(self) -> bool:
    """Fetches the next document from the parent; False when the parent is exhausted."""
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      return False
    self._doc, self._offset, self._doc_state = _channels(doc), 0, state
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    s = self._seq_len
    row = {key: np.zeros(s, np.int32) for key in ROW_KEYS}
    row["tokens"][:] = self._pad_id
    filled = segment = 0
    while filled < s:
      if self._doc is None or self._offset >= len(self._doc[0]):
        if not self._take_document():
          break
        continue  # An empty document takes no segment.
      take = min(len(self._doc[0]) - self._offset, s - filled)
      segment += 1
      piece = slice(self._offset, self._offset + take)
      row["tokens"][filled : filled + take] = self._doc[0][piece]
      row["targets"][filled : filled + take] = self._doc[1][piece]
      row["segment_ids"][filled : filled + take] = segment
      row["positions"][filled : filled + take] = np.arange(take, dtype=np.int32)
      filled += take
      self._offset += take
    if filled == 0:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    """{"parent": the parent's state before the document in hand, "has_doc", "offset"}."""
    return {
      "parent": copy.deepcopy(self._doc_state),
      "has_doc": self._doc is not None,
      "offset": self._offset,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._doc, self._offset = None, 0
    self._doc_state = copy.deepcopy(state["parent"])
    if state["has_doc"]:
      if not self._take_document():
        raise ValueError("data state: the document in hand at the checkpoint no longer exists")
      self._offset = int(state["offset"])
