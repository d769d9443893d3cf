"""Deterministic, checkpointable training data: documents -> packed rows -> per-process batches.

Built on grain (JAX's data loader): `make_pipeline` returns a `grain.DatasetIterator` whose state
is a small JSON-serialisable dict, so it saves beside the train state and resumes exactly.

How a batch of B rows of S tokens is made (b local rows, dims as in the model: b batch, s seq):
1. Documents (`r1jax.data.sources`): the synthetic addition problems (endless), or the documents
   of text / JSONL files, tokenised by the byte tokenizer or a tokenizer.json, eos appended.
2. A global document order: file documents 0..N-1, shuffled with `seed` (reshuffled each epoch,
   grain's index shuffle) and repeated `num_epochs` times (None: forever); synthetic documents
   0, 1, 2, ... in order.
3. Row streams: global row r of every batch is the next row of stream r, which packs the
   documents at positions r, r + B, r + 2B, ... of that order (`r1jax.data.packing`: greedy
   concatenate-then-split, or one truncated document per row with `packing=False`). A row thus
   depends only on (config, r, step) and never on the process count.
4. Process p of P builds only the streams of rows [p*B/P, (p+1)*B/P): the processes' batches,
   concatenated in process order, are the global batch a 1-process run yields.

A finite pipeline (`num_epochs` set) ends, in every process alike, after the number of batches
its shortest row stream fills (`DataIterator.num_batches`); the tails of the longer streams are
dropped.

Each batch is a dict of int32 numpy arrays [b, s]: `tokens`, `targets` (1 where the token is one
the loss counts: every real token, or an SFT document's response tokens), `segment_ids` (1, 2, ...
per document in the row, 0 = padding), `positions` (restarting at 0 per document) and `loss_mask`
(1 where the next token is a counted target of the same document; see `target_mask`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import grain
import numpy as np

from r1jax.data import sources
from r1jax.data.packing import ROW_KEYS, PackIterDataset, unpacked_row
from r1jax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

SOURCES = ("synthetic", "text", "jsonl", "sft")
STATE_FORMAT = "r1jax.data.pipeline/1"
_ENDLESS = 2**62  # Synthetic documents: more than any run reads.
# In-memory documents: grain's advice is no reader threads (they would only contend for the GIL).
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from and how they are cut into batches. Validated on construction.

  Source: `source` is "synthetic" (the addition task, endless, `synthetic_digits` digits per
  operand), "text", "jsonl" or "sft"; `data_files` lists paths or globs for the file sources;
  `jsonl_field` is the string field of each JSONL object; `text_unit` cuts text files into
  documents ("file", "paragraph": blocks between blank lines, "line"); "sft" reads JSONL
  objects with `prompt_field` and `response_field` strings and trains on the response only.

  Tokens: `tokenizer` is None or "bytes" (UTF-8 bytes, vocab 256) or the path of a tokenizer.json
  (or of a directory holding one).

  Batches: `seq_len` tokens per row, `batch_size` rows per global batch (all processes together);
  `packing` packs documents back to back (else one truncated document per row).

  Order: `seed` fixes the shuffle and the synthetic problems; `shuffle` the file documents;
  `num_epochs` passes over the files, None to repeat forever (synthetic: must be None).
  """

  source: str = "synthetic"
  data_files: tuple[str, ...] = ()
  jsonl_field: str = "text"
  text_unit: str = "file"
  prompt_field: str = "prompt"
  response_field: str = "response"
  tokenizer: str | None = None
  synthetic_digits: int = 3
  seq_len: int = 64
  batch_size: int = 16
  packing: bool = True
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None

  def __post_init__(self):
    files = self.data_files
    object.__setattr__(self, "data_files", (files,) if isinstance(files, str) else tuple(files))
    if self.source not in SOURCES:
      raise ValueError(f"source: must be one of {SOURCES}, got {self.source!r}")
    file_source = self.source != "synthetic"
    if file_source and not self.data_files:
      raise ValueError(f"data_files: source {self.source!r} needs at least one file or glob")
    if not file_source and self.data_files:
      raise ValueError("data_files: the synthetic source reads no files; use source text or jsonl")
    if not file_source and self.num_epochs is not None:
      raise ValueError("num_epochs: the synthetic source is endless; leave num_epochs unset")
    for name in ("jsonl_field", "prompt_field", "response_field"):
      value = getattr(self, name)
      if not (isinstance(value, str) and value):
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")
    if self.text_unit not in sources.TEXT_UNITS:
      raise ValueError(f"text_unit: must be one of {sources.TEXT_UNITS}, got {self.text_unit!r}")
    if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
      raise ValueError(f"tokenizer: None, 'bytes' or a tokenizer.json path, got {self.tokenizer!r}")
    for name, low, high in (
      ("synthetic_digits", 1, 18),  # 10**18 still fits int64.
      ("seq_len", 2, None),  # One input and its target.
      ("batch_size", 1, None),
      ("seed", 0, 2**32 - 1),  # grain's index shuffle takes a 32-bit seed.
      ("num_epochs", 1, None),
    ):
      value = getattr(self, name)
      if name == "num_epochs" and value is None:
        continue
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
      if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value!r}")


def check_data(cfg: DataConfig, vocab_size: int) -> None:
  """The checks to run before anything compiles; `make_pipeline` runs them too.

  Raises:
    ValueError: one line naming the flag: a missing data file or a glob matching none
      (`--data_files`), a tokenizer that cannot be loaded or whose vocabulary exceeds the
      model's `vocab_size` (`--tokenizer`, both sizes), the synthetic source with vocab_size < 128.
  """
  _checked_inputs(cfg, vocab_size)


def _checked_inputs(cfg: DataConfig, vocab_size: int) -> tuple[Tokenizer, list[str]]:
  """The loaded tokenizer and the expanded data files, after the checks of `check_data`."""
  if cfg.tokenizer in (None, "bytes"):
    tokenizer: Tokenizer = ByteTokenizer()
    # The synthetic problems are ASCII; file bytes are checked id by id as they are tokenised
    # (a model with a small vocabulary can still train on ASCII files).
    if cfg.source == "synthetic" and vocab_size < 128:
      raise ValueError(
        f"--tokenizer: the synthetic task's ASCII bytes need vocab_size >= 128, the model has "
        f"{vocab_size}; use a larger vocabulary"
      )
  else:
    try:
      tokenizer = load_tokenizer(cfg.tokenizer)
    except ValueError as err:
      raise ValueError(f"--{err}") from None
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(
        f"--tokenizer: {cfg.tokenizer!r} has {tokenizer.vocab_size} tokens, more than the "
        f"model's vocab_size {vocab_size}"
      )
  return tokenizer, sources.expand_data_files(cfg.data_files)


def target_mask(segment_ids: np.ndarray, shift: int = 1) -> np.ndarray:
  """int32 [b, s]: 1 at i where token i + shift is a real token of the same document as token i.

  `shift=1` is the next-token `loss_mask`; depth-k multi-token prediction wants `shift=k + 1`.
  The last `shift` positions of a row have no target in the row and get 0.
  """
  if shift < 1:
    raise ValueError(f"shift: must be >= 1, got {shift}")
  segment_ids = np.asarray(segment_ids)
  mask = np.zeros(segment_ids.shape, np.int32)
  here, there = segment_ids[:, :-shift], segment_ids[:, shift:]
  mask[:, :-shift] = (here > 0) & (here == there)
  return mask


class DataIterator(grain.DatasetIterator):
  """This process's batches (see the module docstring); restartable from `get_state()`.

  Attributes:
    rows: the global row indices this process yields, in order.
    num_batches: batches until the end, the same in every process; None when endless.
    tokenizer: the tokenizer the documents were encoded with.
  """

  def __init__(
    self,
    row_iterators: list[grain.DatasetIterator],
    rows: range,
    num_batches: int | None,
    tokenizer: Tokenizer,
    fingerprint: dict[str, Any],
  ):
    super().__init__(row_iterators)
    self.rows, self.num_batches, self.tokenizer = rows, num_batches, tokenizer
    self._fingerprint = fingerprint
    self._step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._step >= self.num_batches:
      raise StopIteration
    rows = [next(it) for it in self._parents]
    batch = {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}
    # Next-token targets that count: same document, and the next token is a target.
    next_is_target = np.zeros_like(batch["targets"])
    next_is_target[:, :-1] = batch["targets"][:, 1:]
    batch["loss_mask"] = target_mask(batch["segment_ids"]) * next_is_target
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """{"format", "config": what must match to restore, "step": batches yielded,
    "rows": {str(global row): that row stream's grain state}}: JSON-serialisable.

    The row states of all processes merged into one "rows" dict restore on any process count.
    """
    return {
      "format": STATE_FORMAT,
      "config": dict(self._fingerprint),
      "step": self._step,
      "rows": {
        str(r): copy.deepcopy(it.get_state())
        for r, it in zip(self.rows, self._parents, strict=True)
      },
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes where `state` (from `get_state`, possibly JSON round-tripped) left off.

    Raises:
      ValueError: one line: not a state of this format, made by a different data config, or
        lacking one of this process's rows.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise ValueError(f"data state: not a {STATE_FORMAT} state")
    theirs = state.get("config", {})
    changed = sorted(k for k in self._fingerprint if theirs.get(k) != self._fingerprint[k])
    if changed:
      raise ValueError(f"data state: saved with different {', '.join(changed)}; cannot resume")
    missing = [r for r in self.rows if str(r) not in state["rows"]]
    if missing:
      raise ValueError(f"data state: has no state for rows {missing[:5]}")
    for r, it in zip(self.rows, self._parents, strict=True):
      it.set_state(copy.deepcopy(state["rows"][str(r)]))
    self._step = int(state["step"])


def make_pipeline(
  cfg: DataConfig, *, vocab_size: int, process_index: int = 0, process_count: int = 1
) -> DataIterator:
  """This process's iterator over the global batches of `cfg`; see the module docstring.

  Args:
    cfg: the data config.
    vocab_size: the model's vocabulary; every token id is checked to be below it.
    process_index: this process (`jax.process_index()`).
    process_count: all processes (`jax.process_count()`); must divide `cfg.batch_size`.

  Returns:
    A `DataIterator` yielding dicts of int32 numpy arrays [B / process_count, seq_len]:
    tokens, segment_ids, positions, loss_mask.

  Raises:
    ValueError: one line naming the flag: everything `check_data` raises, an unreadable data file,
      bad process arguments, a finite pipeline too short to fill one batch.
  """
  if not (isinstance(process_count, int) and process_count >= 1):
    raise ValueError(f"process_count: must be a positive integer, got {process_count!r}")
  if not (isinstance(process_index, int) and 0 <= process_index < process_count):
    raise ValueError(f"process_index: must be in 0..{process_count - 1}, got {process_index!r}")
  if cfg.batch_size % process_count:
    raise ValueError(
      f"--batch_size: {cfg.batch_size} rows do not split evenly over {process_count} processes"
    )
  tokenizer, files = _checked_inputs(cfg, vocab_size)
  if cfg.source == "synthetic":
    docs: Any = sources.SyntheticDocuments(cfg.seed, cfg.synthetic_digits, tokenizer)
    order = grain.MapDataset.range(_ENDLESS)
  else:
    docs = sources.tokenize_files(
      files,
      cfg.source,
      tokenizer,
      vocab_size,
      jsonl_field=cfg.jsonl_field,
      text_unit=cfg.text_unit,
      prompt_field=cfg.prompt_field,
      response_field=cfg.response_field,
    )
    order = grain.MapDataset.range(len(docs))
    order = order.shuffle(seed=cfg.seed) if cfg.shuffle else order
    order = order.repeat(cfg.num_epochs)
  num_batches = _num_batches(cfg, order, docs)
  local = cfg.batch_size // process_count
  rows = range(process_index * local, (process_index + 1) * local)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  iterators = [_row_stream(cfg, order, docs, r, pad_id).__iter__() for r in rows]
  # What a saved state must match (paths left out: data may move between runs).
  fingerprint = {
    f.name: getattr(cfg, f.name)
    for f in dataclasses.fields(cfg)
    if f.name not in ("data_files", "tokenizer")
  }
  fingerprint["documents"] = None if cfg.source == "synthetic" else len(docs)
  fingerprint["tokenizer_vocab"] = tokenizer.vocab_size
  return DataIterator(iterators, rows, num_batches, tokenizer, fingerprint)


def _row_stream(
  cfg: DataConfig, order: grain.MapDataset, docs: Any, row: int, pad_id: int
) -> grain.IterDataset:
  """Global row `row`'s stream: documents row, row + B, ... of `order`, made into rows."""
  tokens = order[row :: cfg.batch_size].map(docs.__getitem__)
  if not cfg.packing:
    return tokens.map(lambda doc: unpacked_row(doc, cfg.seq_len, pad_id)).to_iter_dataset(_READ)
  return PackIterDataset(tokens.to_iter_dataset(_READ), seq_len=cfg.seq_len, pad_id=pad_id)


def _num_batches(cfg: DataConfig, order: grain.MapDataset, docs: Any) -> int | None:
  """Rows in the shortest row stream of a finite pipeline (None if endless), the same everywhere.

  Raises:
    ValueError: the documents do not fill one batch.
  """
  if cfg.num_epochs is None:
    return None
  if cfg.packing:  # Concatenate-then-split: a stream of T tokens fills ceil(T / S) rows.
    # One grain index look-up per document and epoch (~20 us each here): paid once, at build.
    picks = np.fromiter((order[i] for i in range(len(order))), np.int64, len(order))
    stream = np.arange(len(picks)) % cfg.batch_size
    tokens = np.bincount(stream, weights=docs.lengths[picks], minlength=cfg.batch_size)
    count = int(np.min(-(-tokens.astype(np.int64) // cfg.seq_len)))
  else:
    count = len(order) // cfg.batch_size
  if count == 0:
    raise ValueError(
      f"--num_epochs: {len(docs)} documents x {cfg.num_epochs} epochs do not fill one batch of "
      f"{cfg.batch_size} rows; add data or epochs, or lower --batch_size"
    )
  return count
