"""Documents for the data pipeline: data files found and read, text tokenised, synthetic problems.

A document is one example before packing, a 1-D int32 token array ending in the tokenizer's eos id
when it has one (the byte tokenizer's is 0x03, ETX), so that the model learns where a document
ends. Documents that encode to no tokens are dropped.

- text files: by `text_unit`, a whole file is one document ("file"), or each block between blank
  lines ("paragraph"), or each non-blank line ("line"); blank documents are skipped.
- JSONL files: one JSON object per non-blank line; its `jsonl_field` string is the document.
- SFT JSONL files: one object per line with a prompt and a response string (`prompt_field`,
  `response_field`); the document is prompt + response + eos as a [2, n] array whose second row
  flags the response tokens and the eos, the only targets of the SFT loss.
- synthetic: the addition problems of `r1jax.data.synthetic`, one per document, endless.

File sources are read and tokenised whole, in every process, when the pipeline is built: every
process needs the document count and lengths to agree on the global order and on where a finite
pipeline ends, and a bad file then fails before anything compiles. They are meant for corpora that
fit in host memory.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from r1jax.data.synthetic import addition_documents
from r1jax.data.tokenizer import Tokenizer

TEXT_UNITS = ("file", "paragraph", "line")


def expand_data_files(patterns: Sequence[str]) -> list[str]:
  """The files that `patterns` name: paths, or globs (`**` recurses) whose matches are sorted.

  Order follows `patterns`; a file named twice is read once.

  Raises:
    ValueError: one line naming `--data_files` and the entry: a missing file, a glob matching no
      file, a directory.
  """
  files: list[str] = []
  for pattern in patterns:
    if any(c in pattern for c in "*?["):
      matches = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
      if not matches:
        raise ValueError(f"--data_files: {pattern!r} matches no file")
    elif os.path.isdir(pattern):
      raise ValueError(
        f"--data_files: {pattern!r} is a directory; name its files or a glob such as "
        f"{os.path.join(pattern, '*.txt')!r}"
      )
    elif not os.path.isfile(pattern):
      raise ValueError(f"--data_files: no such file {pattern!r}")
    else:
      matches = [pattern]
    files += [m for m in matches if m not in files]
  return files


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as err:
    raise ValueError(
      f"--data_files: {path!r} is not UTF-8 text ({err.reason} at byte {err.start})"
    ) from None


def _split_text(text: str, unit: str) -> list[str]:
  """The documents of one text file by `unit` (see the module docstring), blanks dropped."""
  if unit == "file":
    pieces = [text]
  elif unit == "paragraph":
    pieces = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
  else:
    pieces = text.splitlines()
  return [p for p in pieces if p.strip()]


def _json_lines(path: str):
  """(line number, parsed value) of each non-blank line of a JSONL file; a line that is not JSON
  is a one-line error naming file:line."""
  for lineno, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield lineno, json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"--data_files: {path}:{lineno} is not valid JSON ({err.msg})") from None


def _string_field(path: str, lineno: int, record, field: str, flag: str) -> str:
  value = record.get(field) if isinstance(record, dict) else None
  if not isinstance(value, str):
    raise ValueError(f"--{flag}: {path}:{lineno} has no string field {field!r}")
  return value


def _jsonl_documents(path: str, field: str) -> list[str]:
  """The `field` string of each JSON object line of `path`; one-line errors name file:line."""
  docs = [_string_field(path, n, record, field, "jsonl_field") for n, record in _json_lines(path)]
  return [d for d in docs if d]


def _sft_records(path: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
  """(prompt, response) of each JSON object line of `path`; one-line errors name file:line."""
  records = []
  for n, record in _json_lines(path):
    prompt = _string_field(path, n, record, prompt_field, "prompt_field")
    response = _string_field(path, n, record, response_field, "response_field")
    if response:
      records.append((prompt, response))
  return records


def encode_sft_example(prompt: str, response: str, tokenizer: Tokenizer) -> np.ndarray:
  """int32 [2, n]: the tokens of prompt + response (+ eos), and 1 on the response and eos."""
  head = list(tokenizer.encode(prompt))
  tail = encode_document(response, tokenizer)
  return np.asarray([head + tail, [0] * len(head) + [1] * len(tail)], np.int32)


def read_documents(
  files: Sequence[str], source: str, *, jsonl_field: str = "text", text_unit: str = "file"
) -> tuple[list[str], list[int]]:
  """The documents of `files` in order, and the index into `files` each came from."""
  texts: list[str] = []
  origins: list[int] = []
  for i, path in enumerate(files):
    if source == "jsonl":
      docs = _jsonl_documents(path, jsonl_field)
    else:
      docs = _split_text(_read_text(path), text_unit)
    texts += docs
    origins += [i] * len(docs)
  return texts, origins


def encode_document(text: str, tokenizer: Tokenizer) -> list[int]:
  """The token ids of one document, eos appended when the tokenizer has one."""
  ids = list(tokenizer.encode(text))
  return ids if tokenizer.eos_id is None else ids + [tokenizer.eos_id]


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
  """Documents held as one flat array: document i is `tokens[offsets[i]:offsets[i + 1]]`."""

  tokens: np.ndarray  # int32 [total tokens]
  offsets: np.ndarray  # int64 [documents + 1]
  targets: np.ndarray | None = None  # SFT: int32 [total tokens], 1 on the response tokens

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    """Document i: tokens [n], or [2, n] (tokens, targets) for SFT documents."""
    piece = slice(self.offsets[i], self.offsets[i + 1])
    if self.targets is None:
      return self.tokens[piece]
    return np.stack([self.tokens[piece], self.targets[piece]])

  @property
  def lengths(self) -> np.ndarray:
    """int64 [documents]: the token count of each document."""
    return np.diff(self.offsets)


def tokenize_files(
  files: Sequence[str],
  source: str,
  tokenizer: Tokenizer,
  vocab_size: int,
  *,
  jsonl_field: str = "text",
  text_unit: str = "file",
  prompt_field: str = "prompt",
  response_field: str = "response",
) -> TokenizedDocuments:
  """Reads and tokenises every document of `files` (see `read_documents`; "sft": see the module
  docstring).

  Raises:
    ValueError: one line: a file that cannot be read as the source, no document in any file, or
      a token id >= `vocab_size` (naming `--tokenizer` and the file).
  """
  if source == "sft":
    encoded, origins = [], []
    for i, path in enumerate(files):
      pairs = _sft_records(path, prompt_field, response_field)
      encoded += [encode_sft_example(p, r, tokenizer) for p, r in pairs]
      origins += [i] * len(pairs)
  else:
    texts, origins = read_documents(files, source, jsonl_field=jsonl_field, text_unit=text_unit)
    encoded = [np.asarray(encode_document(t, tokenizer), np.int32) for t in texts]
  chunks, flags = [], []
  for ids, origin in zip(encoded, origins, strict=True):
    tokens = ids[0] if ids.ndim == 2 else ids
    if tokens.size and tokens.max() >= vocab_size:
      raise ValueError(
        f"--tokenizer: {files[origin]!r} encodes to token id {tokens.max()} >= the model's "
        f"vocab_size {vocab_size}"
      )
    if tokens.size:
      chunks.append(tokens)
      flags.append(ids[1] if ids.ndim == 2 else None)
  if not chunks:
    raise ValueError(f"--data_files: no {source} documents in {list(files)}")
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
  targets = np.concatenate(flags) if source == "sft" else None
  return TokenizedDocuments(np.concatenate(chunks), offsets, targets)


class SyntheticDocuments:
  """Endless addition problems: document i is problem i % 256 of block i // 256 (a pure function
  of (seed, i)). Blocks are drawn whole and the last few kept, since a batch's rows read
  neighbouring documents.
  """

  block_size = 256
  _cached_blocks = 32

  def __init__(self, seed: int, digits: int, tokenizer: Tokenizer):
    self._seed, self._digits, self._tokenizer = seed, digits, tokenizer
    self._blocks: collections.OrderedDict[int, list[np.ndarray]] = collections.OrderedDict()

  def __getitem__(self, i: int) -> np.ndarray:
    block, k = divmod(int(i), self.block_size)
    if block not in self._blocks:
      texts = addition_documents(self._seed, block, self.block_size, self._digits)
      self._blocks[block] = [
        np.asarray(encode_document(t, self._tokenizer), np.int32) for t in texts
      ]
      if len(self._blocks) > self._cached_blocks:
        self._blocks.popitem(last=False)
    self._blocks.move_to_end(block)
    return self._blocks[block][k]
