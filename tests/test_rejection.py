"""r1jax.train.rejection: which replies are kept, and a sampling run's bookkeeping."""

import jax
import jax.numpy as jnp
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.data.tasks import AdditionTask, ChainTask, sample_problems
from r1jax.model import Transformer
from r1jax.train.rejection import RejectionConfig, accept, rejection_sample, select

ADD = AdditionTask(min_digits=3, max_digits=3)


def _problem(task=ADD, seed=0):
  return sample_problems(task, seed, "train", 1)[0]


def test_accept_needs_a_correct_well_formed_thought():
  p = _problem()
  good = ADD.reference_completion(p, think=True)
  assert accept(p, good)
  assert not accept(p, ADD.reference_completion(p, think=False))  # no <think>
  wrong = good.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
  assert not accept(p, wrong)
  assert not accept(p, good + " extra")  # text after </answer>: malformed


def test_accept_needs_the_thought_in_the_target_notation():
  words = ChainTask(notation="words")
  p = _problem(words, seed=3)
  good = words.reference_completion(p, think=True)
  assert accept(p, good)
  numeral = ChainTask(notation="numeral")
  same_chain_in_numerals = numeral.reference_completion(
    type(p)(**{**p.__dict__, "notation": "numeral"}), think=True
  )
  think = same_chain_in_numerals.split("</think>")[0] + "</think>"
  answer = good[good.index("<answer>") :]
  assert not accept(p, think + answer)  # right answer, thought in the other notation


def test_select_keeps_distinct_accepted_replies_up_to_the_limit():
  problems = sample_problems(ADD, 1, "train", 3)
  right = [ADD.reference_completion(p, think=True) for p in problems]
  owners = [0, 0, 0, 1, 2, 2]
  texts = [right[0], right[0], right[0] + " ", "<answer>0</answer>", right[2], "junk"]
  records, accepted = select(problems, owners, texts, keep_per_problem=2)
  # right[0] + " " is well formed too (trailing whitespace is allowed): a distinct reply.
  assert accepted == 4
  assert records == [
    {"prompt": problems[0].prompt, "response": right[0]},
    {"prompt": problems[0].prompt, "response": right[0] + " "},
    {"prompt": problems[2].prompt, "response": right[2]},
  ]


def test_rejection_sample_counts_every_reply_once():
  cfg = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)
  variables = meta.unbox(
    jax.jit(Transformer(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  )
  problems = sample_problems(ADD, 2, "train", 5)
  rcfg = RejectionConfig(samples=3, max_prompt_len=8, max_new_tokens=6, batch_size=4)
  calls = []
  records, stats = rejection_sample(
    cfg, variables, problems, rcfg, progress=lambda done, total: calls.append((done, total))
  )
  assert stats["samples"] == 15 and stats["problems"] == 5
  assert calls[-1] == (15, 15) and len(calls) == 4  # batches of 4, the last one padded
  # 6 new tokens cannot hold a well-formed thought and answer: nothing is kept.
  assert records == [] and stats["accepted_fraction"] == 0.0
