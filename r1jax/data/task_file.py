"""Verifiable problems from a user's JSONL file, as a task the R1 stages train and evaluate on.

One JSON object per line (blank lines are skipped):

  {"prompt": "12*12=", "answer": "144"}
  {"prompt": "2+2=", "answer": "4", "reasoning": "2+2+0=04", "split": "test"}

- `prompt` (non-empty string) and `answer` (non-empty string, or a number, which is written as
  its JSON text) are required.
- `reasoning` (string) is the chain of thought of the reference completion, used where a stage
  needs one (cold-start SFT); without it the problem only has a direct reference answer.
- `split` ("train" or "test") puts the line in a split; without it the split comes from the hash
  of the prompt (`tasks.split_of`), as for the synthetic tasks, so a file without splits still
  has a held-out set that never trains.
- Any other field is an error (a typo such as "anwser" would otherwise drop the answer).

An answer is right when it equals the reference after stripping surrounding whitespace, or,
when both read as numbers (integers, decimals, fractions such as 3/4), when they are equal as
numbers.

`load_task_file` reads and checks the whole file before anything trains: every malformed line
is collected, and the error names the file, the first few bad lines (line number and what is
wrong) and how many there are, so a run never starts on half a dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from fractions import Fraction
from typing import ClassVar

import numpy as np

from r1jax.data.tasks import SPLITS, Problem, _check_fraction, _check_split, reply, split_of

_FIELDS = ("prompt", "answer", "reasoning", "split")
_SHOWN_ERRORS = 3  # bad lines quoted in the error; the rest are counted


class TaskFileError(ValueError):
  """A task file that cannot be read: names the file and its bad lines."""


@dataclasses.dataclass(frozen=True)
class FileProblem(Problem):
  """A problem read from line `line` of a task file."""

  reasoning: str | None = None
  line: int = 0
  fixed_split: str | None = None  # the line's "split", which wins over the hash

  @property
  def key(self) -> str:
    return self.prompt.strip()

  def verify_answer(self, answer_text: str) -> bool:
    return answers_match(self.answer, answer_text)


def _as_number(text: str) -> Fraction | None:
  try:
    return Fraction(text.strip())
  except (ValueError, ZeroDivisionError):
    return None


def answers_match(reference: str, answer: str) -> bool:
  """Equal after stripping whitespace, or equal as numbers when both read as numbers."""
  if answer.strip() == reference.strip():
    return True
  ref, got = _as_number(reference), _as_number(answer)
  return ref is not None and got is not None and ref == got


@dataclasses.dataclass(frozen=True)
class FileTask:
  """The problems of one task file, sampled uniformly within a split.

  `verify` depends on the problem alone (the Task protocol): `tasks.verify` checks a
  FileProblem through its own `verify_answer`.
  """

  name: ClassVar[str] = "file"
  problems: tuple[FileProblem, ...] = ()
  test_fraction: float = 0.1
  path: str = ""

  def __post_init__(self):
    _check_fraction("test_fraction", self.test_fraction)

  def split(self, split: str) -> tuple[FileProblem, ...]:
    _check_split(split)
    return tuple(p for p in self.problems if _split(p, self.test_fraction) == split)

  def sample(self, rng: np.random.Generator, split: str) -> FileProblem:
    pool = self._pools()[split] if split in SPLITS else self.split(split)
    if not pool:
      raise TaskFileError(
        f"task file {self.path or '(none)'}: no {split} problems; give some lines "
        f'"split": "{split}" or add problems'
      )
    return pool[int(rng.integers(len(pool)))]

  def _pools(self) -> dict[str, tuple[FileProblem, ...]]:
    pools = self.__dict__.get("_pool_cache")
    if pools is None:
      pools = {s: self.split(s) for s in SPLITS}
      object.__setattr__(self, "_pool_cache", pools)
    return pools

  def check_prompts(self, encode, max_len: int) -> None:
    """Raises TaskFileError naming the first line whose prompt is longer than `max_len` tokens
    under `encode` (text -> ids): checked before anything compiles, not mid-run."""
    for p in self.problems:
      try:
        n = len(encode(p.prompt))
      except ValueError as err:  # text the tokenizer has no ids for
        raise TaskFileError(f"task file {self.path}: line {p.line}: {err}") from None
      if n > max_len:
        raise TaskFileError(
          f"task file {self.path}: line {p.line}: the prompt is {n} tokens, over "
          f"--max_prompt_len={max_len}; raise it or shorten the prompt"
        )

  def verify(self, problem: FileProblem, answer_text: str) -> bool:
    return problem.verify_answer(answer_text)

  def reference_completion(self, problem: FileProblem, think: bool) -> str:
    if think and problem.reasoning is None:
      raise TaskFileError(
        f'task file {self.path}: line {problem.line} has no "reasoning", and a reference '
        "chain of thought was asked for (cold-start SFT); add one or use direct answers"
      )
    return reply(problem.answer, problem.reasoning if think else None)


def _split(problem: FileProblem, test_fraction: float) -> str:
  return problem.fixed_split or split_of(problem, test_fraction)


def _parse_line(text: str) -> tuple[dict | None, str | None]:
  """(the line's fields, None) or (None, what is wrong with it)."""
  try:
    row = json.loads(text)
  except json.JSONDecodeError as err:
    return None, f"not JSON ({err.msg} at column {err.colno})"
  if not isinstance(row, dict):
    return None, f"a JSON {type(row).__name__}, not an object"
  unknown = sorted(set(row) - set(_FIELDS))
  if unknown:
    return None, f"unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})"
  prompt, answer = row.get("prompt"), row.get("answer")
  if not isinstance(prompt, str) or not prompt.strip():
    return None, '"prompt" is missing or not a non-empty string'
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    return None, '"answer" is missing or not a string or number'
  answer = answer if isinstance(answer, str) else json.dumps(answer)
  if not answer.strip():
    return None, '"answer" is empty'
  reasoning = row.get("reasoning")
  if reasoning is not None and not isinstance(reasoning, str):
    return None, '"reasoning" is not a string'
  split = row.get("split")
  if split is not None and split not in SPLITS:
    return None, f'"split" is {split!r}; use one of {list(SPLITS)}'
  return {"prompt": prompt, "answer": answer, "reasoning": reasoning, "split": split}, None


def load_task_file(path: str, test_fraction: float = 0.1) -> FileTask:
  """Reads and checks every line of `path`.

  Raises:
    TaskFileError: the file is missing or empty, or has malformed lines (all of them are
      counted; the first few are named with their line numbers).
  """
  if not os.path.isfile(path):
    raise TaskFileError(f"task file {path}: no such file")
  problems, errors = [], []
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      lines = f.read().splitlines()
    except UnicodeDecodeError as err:
      raise TaskFileError(f"task file {path}: not UTF-8 text ({err.reason})") from None
  for number, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    row, error = _parse_line(text)
    if error:
      errors.append(f"line {number}: {error}")
      continue
    problems.append(
      FileProblem(
        FileTask.name,
        row["prompt"],
        row["answer"],
        reasoning=row["reasoning"],
        line=number,
        fixed_split=row["split"],
      )
    )
  if errors:
    more = len(errors) - _SHOWN_ERRORS
    tail = f"; and {more} more bad line(s)" if more > 0 else ""
    raise TaskFileError(
      f"task file {path}: {len(errors)} malformed line(s) of {len(problems) + len(errors)}: "
      + "; ".join(errors[:_SHOWN_ERRORS])
      + tail
    )
  if not problems:
    raise TaskFileError(f"task file {path}: no problems (every line is blank)")
  return FileTask(tuple(problems), test_fraction, path)
