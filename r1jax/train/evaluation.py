"""Held-out metrics of a reasoning model, by RECIPE.md's convention.

For P problems with k samples each (temperature 0.6, top-p 0.95) and one greedy reply:
  pass@1        mean over problems of the fraction of its k samples that are correct
  pass@k        mean over problems of the unbiased estimator 1 - C(n - c, k) / C(n, k) (Chen et
                al. 2021) with n samples drawn and c correct; with k = n, "any sample correct"
  greedy_acc    fraction of problems whose greedy reply is correct
  format_rate   fraction of samples that are well formed
  think_rate    fraction of samples with a <think> block
  mean_length   mean generated tokens per sample (EOS included); also over the correct and the
                incorrect samples alone (nan when there are none)
Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import math

import jax
import numpy as np

from r1jax.data.tasks import THINK_OPEN, parse_completion, sample_problems
from r1jax.data.tokenizer import ByteTokenizer
from r1jax.generate import Generator, SamplingConfig, pad_prompts
from r1jax.train.rewards import decode_completion


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (k <= n)."""
  if not 0 < k <= n or not 0 <= c <= n:
    raise ValueError(f"pass_at_k: need 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(correct, well_formed, has_think, lengths, greedy_correct=None, k: int | None = None):
  """The metrics above from per-sample arrays [P, n] (bool, bool, bool, int) and the greedy
  replies' correctness [P]; pass@k for k (default n)."""
  correct = np.asarray(correct, bool)
  p, n = correct.shape
  k = n if k is None else k
  lengths = np.asarray(lengths, np.float64)
  counts = correct.sum(axis=1)
  out = {
    "pass@1": float(correct.mean()),
    "pass@k": float(np.mean([pass_at_k(n, int(c), k) for c in counts])),
    "format_rate": float(np.mean(well_formed)),
    "think_rate": float(np.mean(has_think)),
    "mean_length": float(lengths.mean()),
    "mean_length_correct": float(lengths[correct].mean()) if correct.any() else math.nan,
    "mean_length_incorrect": float(lengths[~correct].mean()) if (~correct).any() else math.nan,
  }
  if greedy_correct is not None:
    out["greedy_acc"] = float(np.mean(np.asarray(greedy_correct, bool)))
  return out


def evaluate(
  model_cfg,
  variables,
  task,
  *,
  num_problems: int = 64,
  samples: int = 4,
  temperature: float = 0.6,
  top_p: float = 0.95,
  max_prompt_len: int = 16,
  max_new_tokens: int = 48,
  seed: int = 0,
  tokenizer=None,
) -> dict[str, float]:
  """`summarize` of `samples` replies (temperature, top-p) and one greedy reply to each of the
  first `num_problems` problems of the task's held-out split for `seed`."""
  tokenizer = tokenizer or ByteTokenizer()
  problems = sample_problems(task, seed, "test", num_problems)
  generator = Generator(
    model_cfg,
    max_prompt_len=max_prompt_len,
    max_new_tokens=max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id or 0,
  )

  def replies(repeat: int, sampling, key):
    encoded = [tokenizer.encode(p.prompt) for p in problems for _ in range(repeat)]
    prompts, lengths = pad_prompts(encoded, max_prompt_len, generator.pad_id)
    gen = jax.device_get(generator(variables, prompts, lengths, key, sampling))
    texts = [decode_completion(row, tokenizer) for row in np.asarray(gen.tokens)]
    return texts, np.asarray(gen.lengths)

  texts, lengths = replies(samples, SamplingConfig(temperature, top_p=top_p), jax.random.key(seed))
  greedy, _ = replies(1, SamplingConfig(temperature=0.0), jax.random.key(seed))
  owner = [problems[i // samples] for i in range(len(texts))]
  parsed = [parse_completion(t) for t in texts]
  correct = [_correct(task, o, p) for o, p in zip(owner, parsed, strict=True)]
  greedy_parsed = [parse_completion(t) for t in greedy]
  greedy_correct = [_correct(task, o, p) for o, p in zip(problems, greedy_parsed, strict=True)]
  shape = (len(problems), samples)
  return summarize(
    np.reshape(correct, shape),
    np.reshape([p.well_formed for p in parsed], shape),
    np.reshape([p.think is not None for p in parsed], shape),
    lengths.reshape(shape),
    greedy_correct,
  )


def think_accuracy(
  model_cfg,
  variables,
  task,
  *,
  num_problems: int = 64,
  max_prompt_len: int = 24,
  max_new_tokens: int = 48,
  seed: int = 0,
  tokenizer=None,
) -> float:
  """Greedy accuracy on the held-out problems when the reply is started with `<think>`: how well
  the model's chain of thought works, whether or not it chooses to think. RL mostly switches a
  model into thinking, so this bounds what R1-Zero-style RL can reach."""
  tokenizer = tokenizer or ByteTokenizer()
  problems = sample_problems(task, seed, "test", num_problems)
  generator = Generator(
    model_cfg,
    max_prompt_len=max_prompt_len,
    max_new_tokens=max_new_tokens,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id or 0,
  )
  encoded = [tokenizer.encode(p.prompt + THINK_OPEN) for p in problems]
  prompts, lengths = pad_prompts(encoded, max_prompt_len, generator.pad_id)
  gen = generator(variables, prompts, lengths, jax.random.key(seed), SamplingConfig(temperature=0))
  texts = [THINK_OPEN + decode_completion(row, tokenizer) for row in np.asarray(gen.tokens)]
  return float(
    np.mean([_correct(task, p, parse_completion(t)) for p, t in zip(problems, texts, strict=True)])
  )


def _correct(task, problem, parsed) -> bool:
  return parsed.answer is not None and task.verify(problem, parsed.answer)
