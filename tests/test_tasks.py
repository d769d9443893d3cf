"""Synthetic verifiable tasks: splits, verifiers, traces and the reply template, checked against
hand-computed values and independent re-derivations (pure Python, no jax)."""

import re
from fractions import Fraction

import numpy as np
import pytest

from r1jax.data import tasks as T


def _samples(task, seed, split, count):
  rng = np.random.default_rng(seed)
  return [task.sample(rng, split) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize("name", sorted(T.TASKS))
def test_splits_are_disjoint_and_each_sample_is_in_its_split(name):
  task = T.TASKS[name]
  train = _samples(task, 0, "train", 1500) + _samples(task, 1, "train", 1500)
  test = _samples(task, 2, "test", 400)
  assert {p.key for p in train}.isdisjoint({p.key for p in test})
  assert all(T.split_of(p, task.test_fraction) == "train" for p in train)
  assert all(T.split_of(p, task.test_fraction) == "test" for p in test)
  assert len({p.key for p in test}) > 50  # the held-out split is not degenerate


@pytest.mark.parametrize("name", sorted(T.TASKS))
def test_sampling_is_deterministic_per_seed(name):
  task = T.TASKS[name]
  assert _samples(task, 5, "train", 50) == _samples(task, 5, "train", 50)
  assert _samples(task, 5, "train", 50) != _samples(task, 6, "train", 50)
  assert T.sample_problems(task, 3, "test", 20) == T.sample_problems(task, 3, "test", 20)


def test_split_depends_on_the_canonical_form_only():
  add = T.AdditionProblem("addition", "", "", 123, 4567)
  swapped = T.AdditionProblem("addition", "", "", 4567, 123)
  assert add.key == swapped.key == "123+4567"
  cd1 = T.CountdownProblem("countdown", "", "", (9, 3, 7), 90, ())
  cd2 = T.CountdownProblem("countdown", "", "", (7, 9, 3), 90, ())
  assert cd1.key == cd2.key == "3,7,9->90"
  ch1 = T.ChainProblem("chain", "", "", 7, (("*", 3), ("+", 5)), "numeral")
  ch2 = T.ChainProblem("chain", "", "", 7, (("*", 3), ("+", 5)), "words")
  assert ch1.key == ch2.key == "7;*3;+5"
  for a, b in ((add, swapped), (cd1, cd2), (ch1, ch2)):
    for fraction in (0.1, 0.5, 0.9):
      assert T.split_of(a, fraction) == T.split_of(b, fraction)


def test_split_fraction_and_nesting():
  problems = [T.AdditionProblem("addition", "", "", a, 1000) for a in range(4000)]
  small = {p.key for p in problems if T.split_of(p, 0.1) == "test"}
  large = {p.key for p in problems if T.split_of(p, 0.3) == "test"}
  assert small <= large
  assert 0.07 < len(small) / 4000 < 0.13 and 0.26 < len(large) / 4000 < 0.34


def test_unknown_split_and_bad_configs_fail_naming_the_field():
  with pytest.raises(ValueError, match="split"):
    T.TASKS["addition"].sample(np.random.default_rng(0), "valid")
  with pytest.raises(ValueError, match="min_digits"):
    T.make_task("addition", min_digits=4, max_digits=3)
  with pytest.raises(ValueError, match="notation"):
    T.make_task("chain", notation="roman")
  with pytest.raises(ValueError, match="test_fraction"):
    T.make_task("countdown", test_fraction=0.0)
  with pytest.raises(ValueError, match="task"):
    T.make_task("sudoku")
  assert T.make_task("addition", max_digits=6).max_digits == 6


# ---------------------------------------------------------------------------------------------
# The reply template.


@pytest.mark.parametrize(
  "text, think, answer, well_formed, well_formed_think",
  [
    ("<think>a</think><answer>5</answer>", "a", "5", True, True),
    (" <think>a</think>\n<answer> 5 </answer>\n ", "a", " 5 ", True, True),
    ("<answer>5</answer>", None, "5", True, False),
    ("<think></think><answer></answer>", "", "", True, True),
    ("5", None, None, False, False),  # no tags
    ("<think>a</think>5", "a", None, False, False),  # answer untagged
    ("<think>a</think><answer>5", "a", None, False, False),  # truncated
    ("<think>a<answer>5</answer>", None, "5", False, False),  # think never closed
    ("<answer>5</answer> so 5", None, "5", False, False),  # text after </answer>
    ("so <answer>5</answer>", None, "5", False, False),  # text before the first tag
    ("<answer>5</answer><answer>6</answer>", None, "5", False, False),  # two answers
    ("<think><think>a</think></think><answer>5</answer>", "<think>a", "5", False, False),
    (
      "<think>a<answer>4</answer></think><answer>5</answer>",
      "a<answer>4</answer>",
      "5",
      False,
      False,
    ),
    ("<answer>5</answer><think>a</think>", "a", None, False, False),  # wrong order
    ("<answer>5<answer>6</answer>", None, "5<answer>6", False, False),  # nested answer
  ],
)
def test_parse_completion(text, think, answer, well_formed, well_formed_think):
  assert T.parse_completion(text) == (think, answer, well_formed)
  assert T.parse_completion(text, require_think=True) == (think, answer, well_formed_think)


@pytest.mark.parametrize("name", sorted(T.TASKS))
def test_reference_completions_are_well_formed_and_verify(name):
  task = T.TASKS[name]
  for problem in _samples(task, 7, "train", 200) + _samples(task, 8, "test", 50):
    assert task.verify(problem, problem.answer) and T.verify(problem, problem.answer)
    for think in (True, False):
      parsed = T.parse_completion(task.reference_completion(problem, think), require_think=think)
      assert parsed.well_formed and (parsed.think is not None) == think
      assert task.verify(problem, parsed.answer)


# ---------------------------------------------------------------------------------------------
# Addition.


def test_addition_by_hand():
  task = T.TASKS["addition"]
  p = T.AdditionProblem("addition", "57+68=", "125", 57, 68)
  assert task.reference_completion(p, True) == (
    "<think>7+8+0=15,5+6+1=12</think><answer>125</answer>"
  )
  assert task.reference_completion(p, False) == "<answer>125</answer>"
  assert task.verify(p, "125") and task.verify(p, " 125\n")
  for wrong in ("124", "126", "0125", "12 5", "+125", "125.0", "", "one two five"):
    assert not task.verify(p, wrong), wrong
  q = T.AdditionProblem("addition", "999+1=", "1000", 999, 1)
  assert task.trace(q) == "9+1+0=10,9+0+1=10,9+0+1=10"


_STEP = re.compile(r"(\d)\+(\d)\+([01])=(\d\d)")


def test_scratchpad_steps_are_arithmetically_right():
  """Re-derive the sum from the trace alone: every step adds up, each carry in is the previous
  step's carry out, the digits are the operands', and the sum digits spell the answer."""
  task = T.AdditionTask(min_digits=1, max_digits=6)
  for p in _samples(task, 11, "train", 300):
    steps = [_STEP.fullmatch(s) for s in task.trace(p).split(",")]
    assert all(steps) and len(steps) == max(len(str(p.a)), len(str(p.b)))
    carry, digits = 0, []
    for i, m in enumerate(steps):
      x, y, c, s = (int(g) for g in m.groups())
      assert (x, y) == (p.a // 10**i % 10, p.b // 10**i % 10)
      assert c == carry and x + y + c == s
      carry, digits = s // 10, [s % 10] + digits
    assert int(str(carry) + "".join(map(str, digits))) == p.a + p.b == int(p.answer)


def test_addition_lengths_and_digits():
  task = T.TASKS["addition"]
  problems = _samples(task, 3, "train", 300)
  assert {len(str(p.a)) for p in problems} == {3, 4, 5}
  longest = max(len(p.prompt + task.reference_completion(p, True)) for p in problems)
  assert longest <= 95  # + EOS: fits a 96-token context with the byte tokenizer


def test_corpus_mixes_direct_and_scratchpad_answers_exactly():
  task = T.TASKS["addition"]
  docs = T.corpus_documents(task, 0, 0, 100, think_fraction=0.2)
  assert docs == T.corpus_documents(task, 0, 0, 100, think_fraction=0.2)
  assert docs != T.corpus_documents(task, 0, 1, 100, think_fraction=0.2)
  assert sum("<think>" in d for d in docs) == 20
  for d in docs:
    prompt, reply = d.split("=", 1)
    a, b = map(int, prompt.split("+"))
    assert T.parse_completion(reply).answer == str(a + b)
  assert sum("<think>" in d for d in T.corpus_documents(task, 0, 0, 10, think_fraction=0.3)) == 3
  with pytest.raises(ValueError, match="think_fraction"):
    T.corpus_documents(task, 0, 0, 10, think_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# Countdown.


@pytest.mark.parametrize(
  "text, value, numbers",
  [
    ("(3+7)*9", 90, [3, 7, 9]),
    (" 9 * ( 3 + 7 ) ", 90, [9, 3, 7]),
    ("3+7*9", 66, [3, 7, 9]),
    ("9-7-3", -1, [9, 7, 3]),  # left associative
    ("8/4/2", 1, [8, 4, 2]),
    ("7/2*2", 7, [7, 2, 2]),  # exact: 7/2 stays a fraction
    ("6/(3/4)", 8, [6, 3, 4]),
    ("((5))", 5, [5]),
    ("1/3", Fraction(1, 3), [1, 3]),
  ],
)
def test_parse_expression_values(text, value, numbers):
  assert T.parse_expression(text) == (value, numbers)


@pytest.mark.parametrize(
  "text",
  [
    "3/(7-7)",  # division by zero
    "3+",
    "(3+7",
    "3+7)",
    "3 7",
    "-3+7",  # no unary minus
    "3**7",
    "07+1",  # no leading zeros
    "3.5+1",
    "__import__('os').system('x')",
    "(" * 40 + "1" + ")" * 40,  # too long for the recursion budget
    "",
  ],
)
def test_parse_expression_rejects(text):
  with pytest.raises(T.ExpressionError):
    T.parse_expression(text)


def test_countdown_verifier_by_hand():
  task = T.TASKS["countdown"]
  p = T.CountdownProblem("countdown", "3,7,9->90:", "(3+7)*9", (3, 7, 9), 90, ())
  for good in ("(3+7)*9", "9*(7+3)", " (7 + 3) * 9 "):
    assert task.verify(p, good), good
  for bad in (
    "3*7+9",  # 30: wrong value
    "(3+7)*9*1",  # an extra number
    "(3+3)*9+36",  # 3 twice, 7 missing
    "9*10",  # numbers not the problem's
    "(3+7)*9=90",  # an equation, not an expression
    "(3+7)*9/(7-7)",
    "",
  ):
    assert not task.verify(p, bad), bad
  q = T.CountdownProblem("countdown", "3,4,6->8:", "6/(3/4)", (3, 4, 6), 8, ())
  assert task.verify(q, "6/(3/4)") and task.verify(q, "6*4/3") and not task.verify(q, "6/3/4")
  r = T.CountdownProblem("countdown", "2,2,5->9:", "2*2+5", (2, 2, 5), 9, ())
  assert task.verify(r, "2*2+5") and not task.verify(r, "2*5-2+2")


def test_countdown_problems_are_solvable_and_their_traces_add_up():
  task = T.TASKS["countdown"]
  for p in _samples(task, 4, "train", 300):
    assert re.fullmatch(r"(\d+),(\d+),(\d+)->(\d+):", p.prompt)
    assert all(1 <= n <= task.max_number for n in p.numbers) and 1 <= p.target <= task.max_target
    value, used = T.parse_expression(p.answer)
    assert value == p.target and sorted(used) == sorted(p.numbers)
    for step in p.steps:  # each operation of the trace, re-evaluated on its own
      lhs, rhs = step.split("=")
      assert T.parse_expression(lhs)[0] == int(rhs)
    assert int(p.steps[-1].split("=")[1]) == p.target


# ---------------------------------------------------------------------------------------------
# Integer chains.


def test_chain_by_hand():
  task = T.TASKS["chain"]
  num = T.ChainProblem("chain", "x=7;x=x*3;x=x+5;x=?", "26", 7, (("*", 3), ("+", 5)), "numeral")
  words = T.ChainProblem("chain", "", "two six", 7, (("*", 3), ("+", 5)), "words")
  assert num.values() == [7, 21, 26]
  assert task.reference_completion(num, True) == (
    "<think>7*3=21,21+5=26</think><answer>26</answer>"
  )
  assert task.reference_completion(words, True) == (
    "<think>seven*three=two one,two one+five=two six</think><answer>two six</answer>"
  )
  for p in (num, words):
    for good in ("26", "two six", " two  six "):
      assert task.verify(p, good), good
    for bad in ("25", "two five", "twenty six", "026", "zero two six", "two-six", ""):
      assert not task.verify(p, bad), bad


def test_numbers_in_both_notations():
  assert T.write_number(0, "words") == "zero" and T.write_number(105, "words") == "one zero five"
  assert T.write_number(105, "numeral") == "105"
  for n in range(0, 1000, 7):
    assert T.read_number(T.write_number(n, "words")) == n == T.read_number(str(n))
  assert T.read_number("zero one") is None and T.read_number("Seven") is None


def _eval_chain_prompt(prompt: str) -> int:
  """Independent evaluation of a chain prompt in either notation."""
  statements = prompt.split(";")
  assert statements[-1] == "x=?"
  value = T.read_number(statements[0].removeprefix("x="))
  for s in statements[1:-1]:
    m = re.fullmatch(r"x=x([-+*])(.+)", s)
    n = T.read_number(m.group(2))
    value = {"+": value + n, "-": value - n, "*": value * n}[m.group(1)]
  return value


@pytest.mark.parametrize("notation", ["numeral", "words"])
def test_chain_prompts_and_traces_in_one_notation(notation):
  task = T.make_task("chain", notation=notation)
  other = "words" if notation == "numeral" else "numeral"
  for p in _samples(task, 9, "train", 200):
    assert p.notation == notation and len(p.ops) == task.steps
    assert _eval_chain_prompt(p.prompt) == T.read_number(p.answer) == p.values()[-1]
    assert all(0 <= v <= task.max_value for v in p.values())
    think = T.parse_completion(task.reference_completion(p, True)).think
    for step in think.split(","):
      m = re.fullmatch(r"(.+?)([-+*])(.+)=(.+)", step)
      x, op, y, z = (T.read_number(g) if i != 1 else g for i, g in enumerate(m.groups()))
      assert {"+": x + y, "-": x - y, "*": x * y}[op] == z
    if notation == "numeral":
      assert not re.search(r"[a-z]", think)
    else:
      assert not re.search(r"\d", think)
    assert (
      p.answer == T.write_number(p.values()[-1], notation) != T.write_number(p.values()[-1], other)
    )


def test_mixed_chain_draws_both_notations():
  notations = {p.notation for p in _samples(T.make_task("chain", notation="mixed"), 0, "train", 40)}
  assert notations == {"numeral", "words"}
