"""r1jax.generate against full forwards without a cache: greedy tokens and sampled log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.generate import Generator, SamplingConfig, pad_prompts, sequence_logprobs
from r1jax.model import Transformer

CFG = ModelConfig.from_preset("tiny", dtype="float32", num_nextn_predict_layers=0)
EOS, PAD, P, N = 3, 0, 8, 12
PROMPTS = [[65, 66, 67, 68, 69, 70, 71], [72, 73], [74, 75, 76, 77]]


@pytest.fixture(scope="module")
def variables():
  v = meta.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  # A larger head scale so that the random model's greedy choices are not near-ties.
  v["params"]["lm_head"] = v["params"]["lm_head"] * 20.0
  return v


@pytest.fixture(scope="module")
def generator():
  return Generator(CFG, max_prompt_len=P, max_new_tokens=N, eos_id=EOS, pad_id=PAD)


@jax.jit
def _full_forward(variables, buffer):
  """Logits of a [1, P + N] buffer: causal, so the positions before the unused tail are exact."""
  return Transformer(CFG).apply(variables, buffer)


def _greedy_by_full_forwards(variables, prompt):
  seq, out = list(prompt), []
  for _ in range(N):
    buffer = np.zeros((1, P + N), np.int32)
    buffer[0, : len(seq)] = seq
    token = int(jnp.argmax(_full_forward(variables, buffer)[0, len(seq) - 1]))
    out.append(token)
    seq.append(token)
    if token == EOS:
      break
  return out


def test_greedy_decode_with_the_cache_equals_full_forwards(variables, generator):
  prompts, lengths = pad_prompts(PROMPTS, P, PAD)
  got = generator(variables, prompts, lengths, jax.random.key(1), SamplingConfig(temperature=0))
  for i, prompt in enumerate(PROMPTS):
    want = _greedy_by_full_forwards(variables, prompt)
    n = int(got.lengths[i])
    assert got.tokens[i, :n].tolist() == want, i
    assert np.all(np.asarray(got.tokens[i, n:]) == PAD) and got.mask[i].sum() == n


def test_sampled_logprobs_equal_the_trainers_recomputed_ones(variables, generator):
  temperature = 0.6
  prompts, lengths = pad_prompts(PROMPTS, P, PAD)
  sampling = SamplingConfig(temperature=temperature)
  got = generator(variables, prompts, lengths, jax.random.key(2), sampling)
  model = Transformer(CFG)
  for i, prompt in enumerate(PROMPTS):
    n = int(got.lengths[i])
    seq = np.zeros((1, P + N), np.int32)  # one shape for every row: one compile
    seq[0, : len(prompt) + n] = prompt + got.tokens[i, :n].tolist()
    pos = jnp.arange(P + N, dtype=jnp.int32)[None]
    recomputed = sequence_logprobs(model, variables, jnp.asarray(seq), pos, None, temperature)
    np.testing.assert_allclose(
      got.logprobs[i, :n], recomputed[0, len(prompt) - 1 : len(prompt) - 1 + n], atol=1e-5, rtol=0
    )
    assert np.all(np.asarray(got.logprobs[i, n:]) == 0.0)


def test_top_k_1_is_greedy_and_top_p_keeps_the_nucleus(variables, generator):
  prompts, lengths = pad_prompts(PROMPTS, P, PAD)
  greedy = generator(variables, prompts, lengths, jax.random.key(3), SamplingConfig(temperature=0))
  top1 = generator(variables, prompts, lengths, jax.random.key(4), SamplingConfig(1.0, top_k=1))
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  tiny_p = generator(
    variables, prompts, lengths, jax.random.key(5), SamplingConfig(1.0, top_p=1e-6)
  )
  np.testing.assert_array_equal(greedy.tokens, tiny_p.tokens)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="^prompts: prompt 1 has 0 tokens"):
    pad_prompts([[1], []], 4, 0)
  with pytest.raises(ValueError, match="^top_p: must be in"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="^max_new_tokens: "):
    Generator(CFG, max_prompt_len=500, max_new_tokens=100, eos_id=EOS)
