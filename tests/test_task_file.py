"""Task files: a user's JSONL problems as a task, and the errors that name their bad lines."""

import json

import numpy as np
import pytest

from r1jax.data import tasks
from r1jax.data.task_file import TaskFileError, answers_match, load_task_file
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.train.rewards import accuracy_reward


def _write(tmp_path, lines, name="problems.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _rows(n, **extra):
  return [json.dumps({"prompt": f"{i}*3=", "answer": str(3 * i), **extra}) for i in range(n)]


def test_a_good_file_loads_every_line_and_keeps_its_fields(tmp_path):
  lines = [
    json.dumps({"prompt": "2+2=", "answer": "4", "reasoning": "2+2+0=04", "split": "test"}),
    "",  # blank lines are skipped
    json.dumps({"prompt": "1/2+1/4=", "answer": 0.75}),  # a number answer is its JSON text
  ]
  task = load_task_file(_write(tmp_path, lines))
  first, second = task.problems
  assert (first.prompt, first.answer, first.reasoning, first.line) == ("2+2=", "4", "2+2+0=04", 1)
  assert (second.answer, second.line, second.reasoning) == ("0.75", 3, None)
  assert task.split("test") == (first,)  # the explicit split wins over the hash
  assert task.reference_completion(first, True) == "<think>2+2+0=04</think><answer>4</answer>"
  assert task.reference_completion(second, False) == "<answer>0.75</answer>"


def test_lines_without_a_split_are_split_by_the_prompt_hash_and_sampled_within_it(tmp_path):
  task = load_task_file(_write(tmp_path, _rows(200)), test_fraction=0.2)
  test, train = task.split("test"), task.split("train")
  assert len(test) + len(train) == 200 and 20 <= len(test) <= 60
  for p in test:  # the same rule as the synthetic tasks: blake2b of (task, key)
    assert tasks.split_of(p, 0.2) == "test"
  rng = np.random.default_rng(0)
  drawn = {task.sample(rng, "test").prompt for _ in range(300)}
  assert drawn == {p.prompt for p in test}  # uniform over the split, never outside it


def test_answers_match_as_text_or_as_numbers():
  assert answers_match("144", " 144\n")
  assert answers_match("0.5", "1/2") and answers_match("3", "3.0")
  assert answers_match("Paris", "Paris") and not answers_match("Paris", "paris")
  assert not answers_match("144", "145") and not answers_match("1/2", "1/0")


def test_rewards_and_tasks_verify_score_a_file_problem(tmp_path):
  task = load_task_file(_write(tmp_path, _rows(3)))
  problem = task.problems[2]  # 2*3= -> 6
  assert tasks.verify(problem, "6") and not tasks.verify(problem, "7")
  assert accuracy_reward(problem, "<answer>6.0</answer>") == 1.0
  assert accuracy_reward(problem, "<think>2*3</think><answer>5</answer>") == 0.0


def test_malformed_lines_are_all_counted_and_the_first_are_named(tmp_path):
  good = json.dumps({"prompt": "1+1=", "answer": "2"})
  lines = [
    good,
    "{not json",
    json.dumps(["1+1=", "2"]),
    json.dumps({"prompt": "1+1="}),
    good,
    json.dumps({"prompt": "1+1=", "anwser": "2"}),
    json.dumps({"prompt": "1+1=", "answer": "2", "split": "dev"}),
  ]
  path = _write(tmp_path, lines)
  with pytest.raises(TaskFileError) as err:
    load_task_file(path)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"task file {path}: 5 malformed line(s) of 7")
  assert "line 2: not JSON" in message
  assert "line 3: a JSON list, not an object" in message
  assert 'line 4: "answer" is missing' in message
  assert "and 2 more bad line(s)" in message  # lines 6 and 7 are counted, not quoted


@pytest.mark.parametrize(
  "line, problem",
  [
    (json.dumps({"prompt": "1+1=", "anwser": "2"}), "unknown field 'anwser'"),
    (json.dumps({"prompt": "1+1=", "answer": "2", "split": "dev"}), "\"split\" is 'dev'"),
    (json.dumps({"prompt": " ", "answer": "2"}), '"prompt" is missing or not a non-empty'),
    (json.dumps({"prompt": "1+1=", "answer": True}), '"answer" is missing or not a string'),
    (json.dumps({"prompt": "1+1=", "answer": "2", "reasoning": 3}), '"reasoning" is not a'),
  ],
)
def test_each_kind_of_bad_line_says_what_is_wrong(tmp_path, line, problem):
  path = _write(tmp_path, [json.dumps({"prompt": "3+3=", "answer": "6"}), line])
  with pytest.raises(TaskFileError, match=f"line 2: {problem}".replace("(", r"\(")):
    load_task_file(path)


def test_missing_empty_and_non_utf8_files_are_named(tmp_path):
  with pytest.raises(TaskFileError, match="no such file"):
    load_task_file(str(tmp_path / "absent.jsonl"))
  with pytest.raises(TaskFileError, match="no problems"):
    load_task_file(_write(tmp_path, ["", "  "]))
  binary = tmp_path / "binary.jsonl"
  binary.write_bytes(b'{"prompt": "\xff"}\n')
  with pytest.raises(TaskFileError, match="not UTF-8"):
    load_task_file(str(binary))


def test_an_empty_split_and_a_missing_chain_of_thought_name_the_fix(tmp_path):
  task = load_task_file(_write(tmp_path, _rows(5, split="train")))
  with pytest.raises(TaskFileError, match='no test problems; give some lines "split": "test"'):
    task.sample(np.random.default_rng(0), "test")
  with pytest.raises(TaskFileError, match='line 1 has no "reasoning"'):
    task.reference_completion(task.problems[0], True)


def test_a_prompt_over_the_length_budget_is_named_before_training(tmp_path):
  lines = _rows(2) + [json.dumps({"prompt": "x" * 40, "answer": "1"})]
  task = load_task_file(_write(tmp_path, lines))
  task.check_prompts(ByteTokenizer().encode, 40)  # fits exactly
  with pytest.raises(
    TaskFileError, match="line 3: the prompt is 40 tokens, over --max_prompt_len=39"
  ):
    task.check_prompts(ByteTokenizer().encode, 39)
