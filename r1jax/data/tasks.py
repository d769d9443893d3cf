"""Synthetic verifiable tasks for the R1 recipe in miniature: addition, Countdown-3, integer chains.

Each task draws problems from a seeded generator, checks an answer by rule (no model, no `eval`)
and writes R1's reply template, which the SFT and pretraining corpora use as targets:

  <think>{reasoning}</think><answer>{answer}</answer>     think=True
  <answer>{answer}</answer>                              think=False: a direct answer

There is no whitespace between the blocks, because the models are tiny and read bytes, so every
byte costs context. `Problem.prompt` is the bare problem text (`123+4567=`). Wrapping it in
`tokenizer.format_r1_prompt` is up to the caller: those markers take about 80 bytes, more than an
addition problem with its scratchpad.

Splits. A problem's split depends on the problem alone, never on a seed. The blake2b hash of its
task name and canonical key (`Problem.key`), read as a number in [0, 1), puts it in "test" when
below the task's `test_fraction` and in "train" otherwise. `Task.sample(rng, split)` draws until
a problem falls in the requested split, so no problem appears in both, whatever seeds the train
and test draws use. The canonical key makes `a+b` and `b+a` one problem, and likewise Countdown's
numbers in any order and a chain in either notation, so a swapped twin of a test problem never
trains. The test set for a smaller `test_fraction` is a subset of the one for a larger fraction.

Tasks (the reasoning traces stay short for byte-level models):
- `addition`: `a+b=`, operands of min_digits..max_digits digits (default 3-5). The scratchpad
  goes digit by digit from the least significant digit. Step i is `x+y+c=CS`: x and y are the
  operands' i-th digits (0 past an operand's end), c is the carry in, and CS is the sum in two
  digits, S being the answer's i-th digit and C the carry out. Steps are joined by ",". Two
  5-digit operands take 95 bytes for prompt + thinking reply.
- `countdown`: three numbers and a target; the answer is an expression over + - * / and
  parentheses that uses each number exactly once. A recursive-descent parser checks it over
  exact fractions (no unary minus, no leading zeros, division by zero is wrong).
- `chain`: `x=7;x=x*3;x=x+5;x=?` in one of two notations. "numeral" writes 7 and 21; "words"
  writes one English word per decimal digit (seven, two one), which gives a 10-word vocabulary
  with no tens or teens to learn. The prompt, the trace's intermediate values and the reference
  answer are all written in the problem's notation, the target of the language-consistency
  reward. The verifier accepts the value in either notation, since correctness and notation are
  separate rewards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from fractions import Fraction
from typing import ClassVar, NamedTuple, Protocol

import numpy as np

SPLITS = ("train", "test")
NOTATIONS = ("numeral", "words")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_MAX_DRAWS = 10_000  # rejection sampling gives up here: the split or the config is too narrow


# ---------------------------------------------------------------------------------------------
# Problems, splits, the template.


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: the task's name, the prompt text and one canonical correct answer."""

  task: str
  prompt: str
  answer: str

  @property
  def key(self) -> str:
    """Canonical form that decides the split; problems that differ only in form share it."""
    raise NotImplementedError


def split_of(problem: Problem, test_fraction: float) -> str:
  """The split of `problem`: "test" if the hash of (task, key), read as a number in [0, 1), is
  below `test_fraction`, else "train".

  blake2b rather than `hash()`: Python salts str hashes per process.
  """
  digest = hashlib.blake2b(f"{problem.task}|{problem.key}".encode(), digest_size=8).digest()
  return "test" if int.from_bytes(digest, "big") / 2**64 < test_fraction else "train"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split: unknown {split!r}; choose one of {SPLITS}")


def _check_fraction(name: str, value: float) -> None:
  if not 0.0 < value < 1.0:
    raise ValueError(f"{name}: needs a value in (0, 1), got {value}")


def reply(answer: str, think: str | None = None) -> str:
  """R1's template: `<think>{think}</think><answer>{answer}</answer>`, without the think block
  when `think` is None."""
  head = "" if think is None else f"{THINK_OPEN}{think}{THINK_CLOSE}"
  return f"{head}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


class Parsed(NamedTuple):
  """What `parse_completion` found: contents of the think and answer blocks (None if absent)."""

  think: str | None
  answer: str | None
  well_formed: bool


_WELL_FORMED = re.compile(r"\s*(?:<think>(.*?)</think>\s*)?<answer>(.*?)</answer>\s*", re.DOTALL)


def _block(text: str, open_tag: str, close_tag: str, start: int = 0) -> tuple[str | None, int]:
  """Contents of the first `open_tag`...`close_tag` at or after `start` and the index after it,
  or (None, start) when either tag is missing."""
  i = text.find(open_tag, start)
  if i < 0:
    return None, start
  j = text.find(close_tag, i + len(open_tag))
  if j < 0:
    return None, start
  return text[i + len(open_tag) : j], j + len(close_tag)


def parse_completion(text: str, *, require_think: bool = False) -> Parsed:
  """Splits a completion, already cut at EOS by the caller, into its think and answer blocks.

  Well formed: optional whitespace, then a `<think>...</think>` block (required when
  `require_think`), optional whitespace, one `<answer>...</answer>` block, then only whitespace.
  Neither block may contain one of the four tags, so nested, repeated and unclosed blocks are
  malformed, and so is text before the first tag or after `</answer>`.

  The extraction is lenient, so that accuracy can be scored apart from format. `think` holds the
  contents of the first complete think block. `answer` holds the first complete answer block
  after it, or after the start of the text when there is no think block. The contents are not
  stripped.
  """
  think, end = _block(text, THINK_OPEN, THINK_CLOSE)
  answer, _ = _block(text, ANSWER_OPEN, ANSWER_CLOSE, end)
  m = _WELL_FORMED.fullmatch(text)
  well_formed = (
    m is not None
    and not (require_think and m.group(1) is None)
    and not any(tag in (g or "") for g in m.groups() for tag in _TAGS)
  )
  return Parsed(think, answer, well_formed)


class Task(Protocol):
  """What training code needs from a task. `verify` depends on the problem's fields alone, so any
  instance of the task's class verifies any of its problems (see the module-level `verify`)."""

  name: str
  test_fraction: float

  def sample(self, rng: np.random.Generator, split: str) -> Problem: ...

  def verify(self, problem: Problem, answer_text: str) -> bool: ...

  def reference_completion(self, problem: Problem, think: bool) -> str: ...


class _Sampler:
  """`sample` by rejection: `_draw` a problem until it lands in the requested split."""

  name: ClassVar[str]
  test_fraction: float

  def _draw(self, rng: np.random.Generator) -> Problem | None:
    raise NotImplementedError

  def sample(self, rng: np.random.Generator, split: str) -> Problem:
    """A problem of `split`; the same generator state always gives the same problem."""
    _check_split(split)
    for _ in range(_MAX_DRAWS):
      problem = self._draw(rng)
      if problem is not None and split_of(problem, self.test_fraction) == split:
        return problem
    raise RuntimeError(f"{self.name}: no {split} problem in {_MAX_DRAWS} draws; widen the config")


# ---------------------------------------------------------------------------------------------
# Carry-chain addition.

_NUMERAL = re.compile(r"0|[1-9][0-9]*")


def _parse_numeral(text: str) -> int | None:
  text = text.strip()
  return int(text) if _NUMERAL.fullmatch(text) else None


@dataclasses.dataclass(frozen=True)
class AdditionProblem(Problem):
  a: int
  b: int

  @property
  def key(self) -> str:
    return f"{min(self.a, self.b)}+{max(self.a, self.b)}"


def addition_steps(a: int, b: int) -> list[tuple[int, int, int, int]]:
  """(x, y, carry_in, x + y + carry_in) for each digit of the longer operand, least significant
  first; the last step's sum is >= 10 when the answer has one more digit."""
  steps, carry = [], 0
  for i in range(max(len(str(a)), len(str(b)))):
    x, y = a // 10**i % 10, b // 10**i % 10
    steps.append((x, y, carry, x + y + carry))
    carry = (x + y + carry) // 10
  return steps


@dataclasses.dataclass(frozen=True)
class AdditionTask(_Sampler):
  """`a+b=` with operands of min_digits..max_digits digits (a 1-digit operand may be 0)."""

  name: ClassVar[str] = "addition"
  min_digits: int = 3
  max_digits: int = 5
  test_fraction: float = 0.1

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(
        f"min_digits/max_digits: need 1 <= min <= max, got {self.min_digits}, {self.max_digits}"
      )
    _check_fraction("test_fraction", self.test_fraction)

  def _operand(self, rng: np.random.Generator) -> int:
    d = int(rng.integers(self.min_digits, self.max_digits + 1))
    return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10**d))

  def _draw(self, rng: np.random.Generator) -> AdditionProblem:
    a, b = self._operand(rng), self._operand(rng)
    return AdditionProblem(self.name, f"{a}+{b}=", str(a + b), a, b)

  def verify(self, problem: AdditionProblem, answer_text: str) -> bool:
    """The answer is the sum as a plain numeral (surrounding whitespace allowed)."""
    return _parse_numeral(answer_text) == problem.a + problem.b

  def trace(self, problem: AdditionProblem) -> str:
    """The scratchpad, e.g. 57+68: `7+8+0=15,5+6+1=12` (answer 125)."""
    return ",".join(f"{x}+{y}+{c}={s:02d}" for x, y, c, s in addition_steps(problem.a, problem.b))

  def reference_completion(self, problem: AdditionProblem, think: bool) -> str:
    return reply(problem.answer, self.trace(problem) if think else None)


# ---------------------------------------------------------------------------------------------
# Countdown-3 and its expression parser.


class ExpressionError(ValueError):
  """An answer that is not a valid Countdown expression (syntax, division by zero, too long)."""


_TOKEN = re.compile(r"\s*(?:(0|[1-9][0-9]*)|([-+*/()]))")
_MAX_EXPRESSION_CHARS = 64  # bounds the parser's recursion on adversarial samples
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _tokenize(text: str) -> list[int | str]:
  tokens: list[int | str] = []
  pos, end = 0, len(text.rstrip())
  while pos < end:
    m = _TOKEN.match(text, pos)
    if m is None:
      raise ExpressionError(f"unexpected {text[pos:].lstrip()[:1]!r} at {pos}")
    tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
    pos = m.end()
  return tokens


class _Parser:
  """expr := term (('+'|'-') term)*;  term := factor (('*'|'/') factor)*;
  factor := NUMBER | '(' expr ')'. Values are Fractions, so 7/2*2 is exactly 7."""

  def __init__(self, tokens: list[int | str]):
    self.tokens, self.pos, self.numbers = tokens, 0, []

  def _peek(self) -> int | str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def _next(self) -> int | str | None:
    token = self._peek()
    self.pos += 1
    return token

  def expr(self) -> Fraction:
    value = self.term()
    while self._peek() in ("+", "-"):
      op, rhs = self._next(), self.term()
      value = value + rhs if op == "+" else value - rhs
    return value

  def term(self) -> Fraction:
    value = self.factor()
    while self._peek() in ("*", "/"):
      op, rhs = self._next(), self.factor()
      if op == "/" and rhs == 0:
        raise ExpressionError("division by zero")
      value = value * rhs if op == "*" else value / rhs
    return value

  def factor(self) -> Fraction:
    token = self._next()
    if isinstance(token, int):
      self.numbers.append(token)
      return Fraction(token)
    if token == "(":
      value = self.expr()
      if self._next() != ")":
        raise ExpressionError("unclosed '('")
      return value
    raise ExpressionError(f"expected a number or '(', got {token!r}")


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
  """The exact value of an arithmetic expression and its numbers in order of appearance.

  Raises:
    ExpressionError: text beyond integers, + - * / ( ) and whitespace; a syntax error; division
      by zero; more than 64 characters.
  """
  if len(text) > _MAX_EXPRESSION_CHARS:
    raise ExpressionError(f"longer than {_MAX_EXPRESSION_CHARS} characters")
  parser = _Parser(_tokenize(text))
  value = parser.expr()
  if parser._peek() is not None:
    raise ExpressionError(f"unexpected {parser._peek()!r} after the expression")
  return value, parser.numbers


def _apply(op: str, x: Fraction, y: Fraction) -> Fraction | None:
  if op == "/":
    return None if y == 0 else x / y
  return {"+": x + y, "-": x - y, "*": x * y}[op]


@dataclasses.dataclass(frozen=True)
class CountdownProblem(Problem):
  numbers: tuple[int, int, int]
  target: int
  steps: tuple[str, ...]  # the reference solution's operations in order, e.g. ("3+7=10", ...)

  @property
  def key(self) -> str:
    return f"{','.join(map(str, sorted(self.numbers)))}->{self.target}"


@dataclasses.dataclass(frozen=True)
class CountdownTask(_Sampler):
  """Numbers in 1..max_number; targets are the positive integer values <= max_target of a random
  expression tree over all three numbers whose intermediate values are positive integers too, so
  every problem has a solution and the reference trace needs no fractions."""

  name: ClassVar[str] = "countdown"
  max_number: int = 20
  max_target: int = 100
  test_fraction: float = 0.1

  def __post_init__(self):
    if self.max_number < 2 or self.max_target < 1:
      raise ValueError(
        f"max_number/max_target: need >= 2 and >= 1, got {self.max_number}, {self.max_target}"
      )
    _check_fraction("test_fraction", self.test_fraction)

  def _draw(self, rng: np.random.Generator) -> CountdownProblem | None:
    numbers = tuple(int(n) for n in rng.integers(1, self.max_number + 1, size=3))
    x, y, z = (numbers[i] for i in rng.permutation(3))
    op1, op2 = (str(o) for o in rng.choice(list("+-*/"), size=2))
    inner_first = bool(rng.integers(2))  # x op1 (y op2 z), else (x op1 y) op2 z
    if inner_first:
      (p, q), (r, s) = (y, z), (x, None)
      first, second = op2, op1
    else:
      (p, q), (r, s) = (x, y), (None, z)
      first, second = op1, op2
    mid = _apply(first, Fraction(p), Fraction(q))
    if mid is None or mid <= 0 or mid.denominator != 1:
      return None
    lhs, rhs = (Fraction(r), mid) if inner_first else (mid, Fraction(s))
    target = _apply(second, lhs, rhs)
    if target is None or target.denominator != 1 or not 1 <= target <= self.max_target:
      return None
    mid, target = int(mid), int(target)
    inner = f"{p}{first}{q}"
    if inner_first:  # x - (y + z), x / (y * z), x * (y + z) need the parentheses
      wrap = _PRECEDENCE[first] < _PRECEDENCE[second] or (
        _PRECEDENCE[first] == _PRECEDENCE[second] and second in "-/"
      )
      expression = f"{r}{second}({inner})" if wrap else f"{r}{second}{inner}"
      last = f"{r}{second}{mid}={target}"
    else:
      wrap = _PRECEDENCE[first] < _PRECEDENCE[second]
      expression = f"({inner}){second}{s}" if wrap else f"{inner}{second}{s}"
      last = f"{mid}{second}{s}={target}"
    prompt = f"{numbers[0]},{numbers[1]},{numbers[2]}->{target}:"
    return CountdownProblem(
      self.name, prompt, expression, numbers, target, (f"{inner}={mid}", last)
    )

  def verify(self, problem: CountdownProblem, answer_text: str) -> bool:
    """An expression alone (no `=target`) using exactly the problem's numbers, each once, whose
    exact value is the target."""
    try:
      value, used = parse_expression(answer_text)
    except ExpressionError:
      return False
    return sorted(used) == sorted(problem.numbers) and value == problem.target

  def reference_completion(self, problem: CountdownProblem, think: bool) -> str:
    """Thinking writes the solution's two operations, e.g. `3+7=10,10*9=90`."""
    return reply(problem.answer, ",".join(problem.steps) if think else None)


# ---------------------------------------------------------------------------------------------
# Integer chains in two notations.


def write_number(n: int, notation: str) -> str:
  """`n` >= 0 as a numeral ("21") or as one word per digit ("two one")."""
  if notation == "numeral":
    return str(n)
  return " ".join(DIGIT_WORDS[int(d)] for d in str(n))


def read_number(text: str) -> int | None:
  """The value of a numeral or of digit words (the `write_number` forms, surrounding whitespace
  allowed, no leading zeros); None for anything else."""
  value = _parse_numeral(text)
  if value is not None:
    return value
  words = text.split()
  if (
    not words or any(w not in DIGIT_WORDS for w in words) or (words[0] == "zero" and len(words) > 1)
  ):
    return None
  return int("".join(str(DIGIT_WORDS.index(w)) for w in words))


@dataclasses.dataclass(frozen=True)
class ChainProblem(Problem):
  start: int
  ops: tuple[tuple[str, int], ...]  # ("*", 3), ("+", 5), ...
  notation: str  # the notation of prompt, trace and answer: the language-consistency target

  @property
  def key(self) -> str:
    """The chain without its notation: both notations of a chain share a split."""
    return f"{self.start};" + ";".join(f"{op}{n}" for op, n in self.ops)

  def values(self) -> list[int]:
    """x after each assignment, the start included."""
    values = [self.start]
    for op, n in self.ops:
      values.append(int(_apply(op, Fraction(values[-1]), Fraction(n))))
    return values


@dataclasses.dataclass(frozen=True)
class ChainTask(_Sampler):
  """`x=7;x=x*3;x=x+5;x=?`: a start in 1..9, then `steps` operations of + - * with operands in
  1..max_operand (2..max_operand for *) that keep every value in 0..max_value. `notation` is
  "numeral", "words", or "mixed" (each problem draws one of the two)."""

  name: ClassVar[str] = "chain"
  steps: int = 2  # 2 keeps a words-notation document near 100 bytes
  notation: str = "numeral"
  max_operand: int = 9
  max_value: int = 99
  test_fraction: float = 0.1

  def __post_init__(self):
    if self.notation not in NOTATIONS + ("mixed",):
      raise ValueError(f"notation: unknown {self.notation!r}; choose one of {NOTATIONS}, 'mixed'")
    if self.steps < 1 or self.max_operand < 2 or self.max_value < 9:
      raise ValueError(
        f"steps/max_operand/max_value: need >= 1, >= 2, >= 9, got {self.steps}, "
        f"{self.max_operand}, {self.max_value}"
      )
    _check_fraction("test_fraction", self.test_fraction)

  def _draw(self, rng: np.random.Generator) -> ChainProblem:
    value, ops = int(rng.integers(1, 10)), []
    start = value
    while len(ops) < self.steps:
      op = str(rng.choice(list("+-*")))
      n = int(rng.integers(2 if op == "*" else 1, self.max_operand + 1))
      new = int(_apply(op, Fraction(value), Fraction(n)))
      if 0 <= new <= self.max_value:
        ops.append((op, n))
        value = new
    notation = self.notation
    if notation == "mixed":
      notation = NOTATIONS[int(rng.integers(2))]
    w = lambda n: write_number(n, notation)
    prompt = f"x={w(start)};" + "".join(f"x=x{op}{w(n)};" for op, n in ops) + "x=?"
    return ChainProblem(self.name, prompt, w(value), start, tuple(ops), notation)

  def verify(self, problem: ChainProblem, answer_text: str) -> bool:
    """The final value, as a numeral or in digit words: notation has its own reward."""
    return read_number(answer_text) == problem.values()[-1]

  def trace(self, problem: ChainProblem) -> str:
    """Each step's arithmetic in the problem's notation: `7*3=21,21+5=26`, or
    `seven*three=two one,two one+five=two six`."""
    w = lambda n: write_number(n, problem.notation)
    values = problem.values()
    return ",".join(
      f"{w(v)}{op}{w(n)}={w(after)}"
      for v, (op, n), after in zip(values[:-1], problem.ops, values[1:], strict=True)
    )

  def reference_completion(self, problem: ChainProblem, think: bool) -> str:
    return reply(problem.answer, self.trace(problem) if think else None)


# ---------------------------------------------------------------------------------------------
# Registry and corpora.

TASKS: dict[str, Task] = {
  "addition": AdditionTask(),
  "countdown": CountdownTask(),
  "chain": ChainTask(),
}


def make_task(name: str, **options) -> Task:
  """The task `name` with its config fields overridden, e.g. make_task("addition", max_digits=6).

  Raises:
    ValueError: an unknown task name (the config's own checks name a bad field).
  """
  if name not in TASKS:
    raise ValueError(f"task: unknown {name!r}; choose one of {sorted(TASKS)}")
  return dataclasses.replace(TASKS[name], **options)


def verify(problem: Problem, answer_text: str) -> bool:
  """Checks `answer_text` with the verifier of the problem's task (a problem that carries its
  own check, like a task file's `FileProblem`, is checked by that)."""
  own = getattr(problem, "verify_answer", None)
  if own is not None:
    return own(answer_text)
  return TASKS[problem.task].verify(problem, answer_text)


def sample_problems(task: Task, seed: int, split: str, count: int) -> list[Problem]:
  """`count` problems of `split`, the same for the same (task config, seed, split): e.g. the
  held-out set that every stage of a pipeline evaluates on. Problems may repeat within a list
  when the split is small."""
  _check_split(split)
  rng = np.random.default_rng([seed, SPLITS.index(split), 2])
  return [task.sample(rng, split) for _ in range(count)]


def corpus_documents(
  task: Task,
  seed: int,
  block: int,
  count: int,
  *,
  think_fraction: float = 0.2,
  split: str = "train",
) -> list[str]:
  """`count` pretraining documents `prompt + reference completion`, the same for the same
  (task config, seed, block, split).

  Exactly round(count * think_fraction) of them, at random positions, carry the `<think>` trace,
  and the rest answer directly. An exact mix per block keeps a small corpus's ratio at the value
  asked for (the recipe uses 20-30%). EOS is added when the documents are encoded
  (`sources.encode_document`).
  """
  if not 0.0 <= think_fraction <= 1.0:
    raise ValueError(f"think_fraction: needs a value in [0, 1], got {think_fraction}")
  rng = np.random.default_rng([seed, block, SPLITS.index(split), 3])
  thinks = np.zeros(count, bool)
  thinks[rng.permutation(count)[: round(count * think_fraction)]] = True
  problems = [task.sample(rng, split) for _ in range(count)]
  return [
    p.prompt + task.reference_completion(p, bool(t)) for p, t in zip(problems, thinks, strict=True)
  ]
