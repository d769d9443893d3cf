"""Tokenizers: a byte tokenizer for synthetic tasks, a `tokenizers` wrapper, the R1 chat format.

- `ByteTokenizer` maps text to its UTF-8 bytes (vocab 256, so it fits the `tiny` preset); the
  specials are ASCII control bytes: pad = 0x00 (NUL), bos = 0x02 (STX), eos = 0x03 (ETX).
- `HFTokenizer` wraps a local `tokenizer.json` (the Hugging Face `tokenizers` format, as shipped
  with DeepSeek-R1); it never touches the network or a model hub, only paths.
- `format_r1_prompt` writes a user turn in DeepSeek-R1's chat format, with the reply forced to
  open with `<think>` as in R1's evaluation setup.
- `TaskTokenizer` covers only the synthetic tasks' alphabet, each R1 tag one token (vocab 64):
  a trace is ~40% fewer tokens than in bytes, which is what a CPU-sized reasoning model needs.
- `load_tokenizer("bytes" | "task" | path)` picks one from a command-line string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
  """What training and sampling code needs from a tokenizer.

  `bos_id`, `eos_id` and `pad_id` are None where the tokenizer has no such token.
  """

  @property
  def vocab_size(self) -> int: ...

  @property
  def bos_id(self) -> int | None: ...

  @property
  def eos_id(self) -> int | None: ...

  @property
  def pad_id(self) -> int | None: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class R1Markers(NamedTuple):
  """DeepSeek-R1's chat markers; the bars are U+FF5C (full width) and the space is U+2581."""

  bos: str = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
  eos: str = "<\uff5cend\u2581of\u2581sentence\uff5c>"
  user: str = "<\uff5cUser\uff5c>"
  assistant: str = "<\uff5cAssistant\uff5c>"
  think_open: str = "<think>"
  think_close: str = "</think>"


R1_MARKERS = R1Markers()


def format_r1_prompt(user_text: str, *, think: bool = True) -> str:
  """One user turn in R1's chat format, ending where the assistant's reply begins.

  Args:
    user_text: the user's message, inserted verbatim.
    think: open the reply with `<think>\\n`. R1's evaluation convention forces this, since the
      model otherwise sometimes skips its reasoning; False leaves the reply's start to the model.

  Returns:
    `<｜begin▁of▁sentence｜><｜User｜>{user_text}<｜Assistant｜>` plus `<think>\\n` if `think`.
  """
  m = R1_MARKERS
  prompt = f"{m.bos}{m.user}{user_text}{m.assistant}"
  return prompt + (f"{m.think_open}\n" if think else "")


class ByteTokenizer:
  """UTF-8 bytes as token ids: ids 0..255 are the bytes themselves, vocab 256.

  The specials are control bytes, not extra ids, so the vocabulary stays 256 and matches the
  `tiny` preset: pad = 0x00 (NUL), bos = 0x02 (STX, "start of text"), eos = 0x03 (ETX, "end of
  text"). Text that itself holds these bytes encodes to the same ids; synthetic tasks never do.
  Encoding then decoding any str gives it back exactly; R1 markers are just their bytes here.
  """

  vocab_size = 256
  pad_id = 0x00
  bos_id = 0x02
  eos_id = 0x03

  def encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of `text`, as ints in 0..255."""
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    """Text from byte ids; any malformed UTF-8 (a model's sample may cut a character in two)
    becomes U+FFFD rather than raising, so decoding a sample never fails.

    Raises:
      ValueError: an id outside 0..255 (e.g. sampled from a model with a larger vocabulary).
    """
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < 256]
    if bad:
      raise ValueError(f"ByteTokenizer.decode: ids {bad[:5]} are outside 0..255")
    return bytes(ids).decode("utf-8", errors="replace")


def _tokenizer_json(path: str | os.PathLike) -> str | None:
  """`path` itself if it is a file, `path/tokenizer.json` if that is a file, else None."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  inner = os.path.join(path, "tokenizer.json")
  return inner if os.path.isfile(inner) else None


def _token_content(entry: Any) -> str | None:
  """A token from tokenizer_config.json: a plain string, or an AddedToken dict with `content`."""
  if isinstance(entry, dict):
    return entry.get("content")
  return entry if isinstance(entry, str) else None


class HFTokenizer:
  """A `tokenizers.Tokenizer` loaded from a local tokenizer.json, behind the `Tokenizer` API.

  bos/eos/pad come from `tokenizer_config.json` next to tokenizer.json when it names them;
  otherwise bos/eos fall back to R1's markers if the vocabulary has them, and pad to eos (as in
  DeepSeek's own config: padded positions are masked, so any id that exists will do).
  """

  def __init__(self, tokenizer: Any, config: dict[str, Any] | None = None):
    """Wraps an already built `tokenizers.Tokenizer`; `config` is a parsed tokenizer_config."""
    self._tok = tokenizer
    config = config or {}
    self._bos_id = self._special_id(config.get("bos_token"), R1_MARKERS.bos)
    self._eos_id = self._special_id(config.get("eos_token"), R1_MARKERS.eos)
    pad = self._special_id(config.get("pad_token"), None)
    self._pad_id = self._eos_id if pad is None else pad

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads `path` (a tokenizer.json, or a directory holding one) and its tokenizer_config.json.

    Raises:
      FileNotFoundError: `path` is neither a file nor a directory with a tokenizer.json.
    """
    import tokenizers  # Imported here so the byte tokenizer works without the package.

    file = _tokenizer_json(path)
    if file is None:
      raise FileNotFoundError(
        f"HFTokenizer.from_file: {os.fspath(path)!r} is neither a tokenizer.json file nor a "
        "directory holding one"
      )
    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    config = None
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return cls(tokenizers.Tokenizer.from_file(file), config)

  def _special_id(self, configured: Any, fallback: str | None) -> int | None:
    """The id of the configured token, else of `fallback`, else None if neither is in vocab."""
    for token in (_token_content(configured), fallback):
      if token is not None and (i := self._tok.token_to_id(token)) is not None:
        return i
    return None

  @property
  def vocab_size(self) -> int:
    """Size including added tokens, since R1's markers are added tokens."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  @property
  def eos_id(self) -> int | None:
    return self._eos_id

  @property
  def pad_id(self) -> int | None:
    return self._pad_id

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. Added tokens written in the text (R1's markers) are always single
    ids; `add_special_tokens` only adds what the post-processor would (e.g. a leading bos),
    off by default because `format_r1_prompt` already writes bos.
    """
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, special tokens included: the library's default skips them, which would
    silently drop R1's markers from a decoded transcript.
    """
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class TaskTokenizer:
  """The synthetic tasks' characters and R1's four tags as single tokens, vocab 64.

  Ids: 0 pad, 1 bos, 2 eos, 3..6 `<think>`, `</think>`, `<answer>`, `</answer>`, then one id per
  character of `CHARS` (what `r1jax.data.tasks` writes: digits, operators, punctuation, lower-case
  letters for digit words, space); the rest of the 64 are unused. A tag is matched before its
  characters, so `<think>` is one token wherever it appears. Decoding gives the text back.
  """

  vocab_size = 64
  pad_id, bos_id, eos_id = 0, 1, 2
  TAGS = ("<think>", "</think>", "<answer>", "</answer>")
  CHARS = " ()*+,-/0123456789:;=>?abcdefghijklmnopqrstuvwxyz"

  def __init__(self):
    self._pieces = ["<pad>", "<bos>", "<eos>", *self.TAGS, *self.CHARS]
    self._char_ids = {c: 3 + len(self.TAGS) + i for i, c in enumerate(self.CHARS)}
    self._tag_ids = {t: 3 + i for i, t in enumerate(self.TAGS)}

  def encode(self, text: str) -> list[int]:
    """Ids of `text`.

    Raises:
      ValueError: a character outside `CHARS` (named, with its position).
    """
    ids, i = [], 0
    while i < len(text):
      if text[i] == "<":
        tag = next((t for t in self.TAGS if text.startswith(t, i)), None)
        if tag is not None:
          ids.append(self._tag_ids[tag])
          i += len(tag)
          continue
      if text[i] not in self._char_ids:
        raise ValueError(
          f"TaskTokenizer: character {text[i]!r} at {i} of {text[:40]!r} is not in the task "
          "alphabet; use the bytes tokenizer for free text"
        )
      ids.append(self._char_ids[text[i]])
      i += 1
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text from ids; the specials decode to nothing, unused ids to U+FFFD (a sample of an
    untrained model may hold them), so decoding a sample never fails."""
    out = []
    for i in (int(i) for i in ids):
      if i in (self.pad_id, self.bos_id, self.eos_id):
        continue
      out.append(self._pieces[i] if 0 <= i < len(self._pieces) else "\ufffd")
    return "".join(out)


def load_tokenizer(spec: str) -> Tokenizer:
  """A tokenizer from a command-line string.

  Args:
    spec: "bytes" for `ByteTokenizer`, "task" for `TaskTokenizer`, else the path of a
      tokenizer.json or of a directory holding one (`HFTokenizer`). The two names win over
      files of those names in the working dir.

  Raises:
    ValueError: `spec` is neither, in one line that names it and says what is accepted.
  """
  if spec == "bytes":
    return ByteTokenizer()
  if spec == "task":
    return TaskTokenizer()
  if _tokenizer_json(spec) is None:
    raise ValueError(
      f"tokenizer: {spec!r} is neither 'bytes', 'task' nor a tokenizer.json path (a file, or a "
      "directory holding tokenizer.json); use 'bytes', 'task' or an existing path"
    )
  return HFTokenizer.from_file(spec)


def load_tokenizer_for(spec: str, vocab_size: int) -> Tokenizer:
  """`load_tokenizer(spec)` for a model of `vocab_size` ids.

  Raises:
    ValueError: the tokenizer has more ids than the model (one line naming --tokenizer).
  """
  tokenizer = load_tokenizer(spec)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"--tokenizer: {spec} has {tokenizer.vocab_size} ids, the model {vocab_size}; give the "
      "tokenizer the model was trained with"
    )
  return tokenizer
