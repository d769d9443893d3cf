"""Rule-based rewards on small hand-written completions, values computed by hand."""

import numpy as np
import pytest

from r1jax.data.tasks import AdditionProblem, ChainProblem, CountdownProblem
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.train import rewards as R

ADD = AdditionProblem("addition", "57+68=", "125", 57, 68)
CHAIN_WORDS = ChainProblem("chain", "", "two six", 7, (("*", 3), ("+", 5)), "words")
CHAIN_NUM = ChainProblem("chain", "", "26", 7, (("*", 3), ("+", 5)), "numeral")
COUNTDOWN = CountdownProblem("countdown", "3,7,9->90:", "(3+7)*9", (3, 7, 9), 90, ())


@pytest.mark.parametrize(
  "problem, completion, lenient, strict",
  [
    (ADD, "<think>7+8+0=15,5+6+1=12</think><answer>125</answer>", 1.0, 1.0),
    (ADD, "<answer>125</answer>", 1.0, 1.0),
    (ADD, "<answer>126</answer>", 0.0, 0.0),  # off by one
    (ADD, "125", 0.0, 0.0),  # no answer block
    (ADD, "<answer>125</answer> done", 1.0, 0.0),  # right, but text after </answer>
    (ADD, "<think>7+8</think><answer>125", 0.0, 0.0),  # truncated
    (COUNTDOWN, "<answer>9*(3+7)</answer>", 1.0, 1.0),
    (COUNTDOWN, "<answer>9*(3+3)+36</answer>", 0.0, 0.0),  # a number used twice
    (CHAIN_WORDS, "<answer>26</answer>", 1.0, 1.0),  # either notation is correct
  ],
)
def test_accuracy(problem, completion, lenient, strict):
  assert R.accuracy_reward(problem, completion) == lenient
  assert R.accuracy_reward(problem, completion, strict=True) == strict


def test_format():
  think = "<think>x</think><answer>1</answer>"
  direct = "<answer>1</answer>"
  assert R.format_reward(ADD, think) == R.format_reward(ADD, direct) == 1.0
  assert R.format_reward(ADD, think, require_think=True) == 1.0
  assert R.format_reward(ADD, direct, require_think=True) == 0.0
  assert R.format_reward(ADD, "<answer>1</answer>x") == 0.0
  assert R.format_reward(ADD, "<think>x<answer>1</answer>") == 0.0


@pytest.mark.parametrize(
  "think, units, words, numeral",
  [
    ("seven*three=two one", (0, 4), 1.0, 0.0),
    ("7*3=21", (4, 0), 0.0, 1.0),
    ("seven*three=21", (2, 2), 0.5, 0.5),  # 2 digits, 2 words
    ("7*three=two 1", (2, 2), 0.5, 0.5),
    ("x=x+Five;someone 12", (2, 1), 1 / 3, 2 / 3),  # "x" and "someone" are not units
    ("twoone 3", (1, 0), 0.0, 1.0),  # a run of letters that is no digit word counts nothing
    ("no numbers here", (0, 0), 0.0, 0.0),
    ("", (0, 0), 0.0, 0.0),
  ],
)
def test_language_consistency_fractions(think, units, words, numeral):
  assert R.notation_units(think) == {"numeral": units[0], "words": units[1]}
  assert R.language_consistency(think, "words") == pytest.approx(words)
  assert R.language_consistency(think, "numeral") == pytest.approx(numeral)


def test_language_reward_reads_the_think_block_in_the_problem_notation():
  c = "<think>seven*three=21,21+five=two six</think><answer>two six</answer>"
  # think units: seven three | 2 1 | 2 1 | five two six -> 5 words, 4 digits.
  assert R.language_reward(CHAIN_WORDS, c) == pytest.approx(5 / 9)
  assert R.language_reward(CHAIN_NUM, c) == pytest.approx(4 / 9)
  assert R.language_reward(CHAIN_WORDS, "<answer>two six</answer>") == 0.0  # no think
  assert R.language_reward(CHAIN_WORDS, "<think>seven*three</think>") == 1.0  # unformatted
  assert R.language_reward(ADD, "<think>7+8+0=15</think><answer>15</answer>") == 1.0
  with pytest.raises(ValueError, match="notation"):
    R.language_consistency("1", "roman")


def test_reward_set_weights_and_per_function_values():
  rs = R.combine({"accuracy": 1.0, "format_think": 0.5, "language": 0.25})
  completions = [
    "<think>seven*three=two one,two one+five=two six</think><answer>two six</answer>",
    "<think>7*3=21,21+five=two six</think><answer>two five</answer>",
    "<answer>26</answer>",
  ]
  out = rs([CHAIN_WORDS] * 3, completions)
  # language of #2: words five two six = 3; digits 7 3 2 1 2 1 = 6 -> 3 / 9.
  want = {"accuracy": [1, 0, 1], "format_think": [1, 1, 0], "language": [1, 1 / 3, 0]}
  for name, values in want.items():
    np.testing.assert_allclose(out.per_function[name], values, rtol=1e-6)
    assert out.per_function[name].dtype == np.float32
  np.testing.assert_allclose(out.total, [1 + 0.5 + 0.25, 0.5 + 0.25 / 3, 1.0], rtol=1e-6)
  means = out.means()
  assert means["reward/accuracy"] == pytest.approx(2 / 3)
  assert means["reward/total"] == pytest.approx((1.75 + 0.5 + 0.25 / 3 + 1.0) / 3)


def test_reward_set_groups_completions_by_problem():
  rs = R.RewardSet({"accuracy": 2.0, "format": 1.0})
  completions = ["<answer>125</answer>", "<answer>124</answer>", "126", "<answer>26</answer>"]
  out = rs([ADD, CHAIN_NUM], completions, group_size=2)
  # ADD: right + formatted, wrong + formatted; CHAIN_NUM: no tags, right + formatted.
  np.testing.assert_allclose(out.total, [3.0, 1.0, 0.0, 3.0])
  with pytest.raises(ValueError, match="group_size"):
    rs([ADD, CHAIN_NUM], completions, group_size=1)


def test_reward_set_custom_functions_and_unknown_names():
  length = lambda problem, completion: float(len(completion))
  rs = R.combine({"len": 0.5, "format": 1.0}, {**R.REWARD_FUNCTIONS, "len": length})
  want = 0.5 * len("<answer>") + 0.5 * 1 + 0.5 * len("</answer>") + 1.0  # 0.5 * 18 + 1
  np.testing.assert_allclose(rs([ADD], ["<answer>1</answer>"]).total, [want])
  with pytest.raises(ValueError, match="unknown"):
    R.combine({"acuracy": 1.0})
  with pytest.raises(ValueError, match="empty"):
    R.combine({})


def test_decode_completion_stops_at_eos():
  tok = ByteTokenizer()
  ids = tok.encode("<answer>125</answer>") + [tok.eos_id] + tok.encode(" junk") + [0, 0]
  assert R.decode_completion(ids, tok) == "<answer>125</answer>"
  assert R.decode_completion(tok.encode("<answer>1"), tok) == "<answer>1"  # truncated, no EOS


def test_a_reward_that_raises_or_returns_nan_is_named_with_its_item():
  import math
  import re

  import pytest

  from r1jax.data.tasks import AdditionTask, sample_problems
  from r1jax.train.rewards import RewardError, RewardSet

  problems = sample_problems(AdditionTask(), 0, "train", 2)

  def broken(problem, text):
    return 1 / 0 if text == "bad" else 1.0

  rewards = RewardSet({"broken": 1.0}, {"broken": broken})
  with pytest.raises(
    RewardError,
    match=rf"reward 'broken' raised ZeroDivisionError.*{re.escape(problems[1].prompt)}.*'bad'",
  ):
    rewards(problems, ["ok", "ok", "ok", "bad"], group_size=2)
  nan = RewardSet({"nan": 1.0}, {"nan": lambda p, t: math.nan})
  with pytest.raises(RewardError, match=r"reward 'nan' returned nan .*must be finite"):
    nan(problems, ["a", "b"])
