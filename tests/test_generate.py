"""r1jax.generate against full forwards without a cache: greedy tokens and sampled log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from r1jax import ModelConfig
from r1jax.generate import Generator, SamplingConfig, pad_prompts, sequence_logprobs
from r1jax.model import Transformer
from r1jax.speculative import SpeculativeGenerator

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


# ------------------------------------------------------------------ speculative decoding (MTP)
#
# Weights: "random" (the MTP almost never agrees with the head), "half" (random trunk, MTP
# eh_proj = [I; 0]: it drafts from the newest token's embedding alone, right about a third of
# the time, and differently per row, so the batch leaves holes in the caches), and two
# constructions with every block's norms zeroed (each block is then the identity, so the main
# model's next token is f(current token) and the MTP with eh_proj = [+-I; 0] drafts f(t_{i+1})
# up to a positive scale (always right) or f's argmin (always wrong)).

MTP_CFG = ModelConfig.from_preset("tiny", dtype="float32")
SPEC_PROMPTS = PROMPTS + [[5, 9], [200, 201, 202, 203, 204, 205, 206, 207]]


@pytest.fixture(scope="module")
def mtp_variables():
  v = meta.unbox(Transformer(MTP_CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  v["params"]["lm_head"] = v["params"]["lm_head"] * 20.0
  return v


def _with_drafter(variables, block_scale: float, sign: float):
  flat = traverse_util.flatten_dict(variables["params"])
  for path in flat:
    if len(path) > 1 and path[-2] in ("attn_norm", "ffn_norm"):
      flat[path] = flat[path] * block_scale
  m = MTP_CFG.hidden_size
  flat[("mtp_0", "eh_proj")] = jnp.concatenate([sign * jnp.eye(m), jnp.zeros((m, m))])
  return {**variables, "params": traverse_util.unflatten_dict(flat)}


@jax.jit
def _full_mtp_forward(variables, buffer):
  return Transformer(MTP_CFG).apply(variables, buffer, mtp=True)


@pytest.fixture(scope="module")
def spec_eos(mtp_variables):
  """An EOS the "half" weights reach: the 4th greedy token after the first prompt."""
  seq = list(SPEC_PROMPTS[0])
  for _ in range(4):
    buffer = np.zeros((1, P + N), np.int32)
    buffer[0, : len(seq)] = seq
    logits, _ = _full_mtp_forward(_with_drafter(mtp_variables, 1.0, 1.0), buffer)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[-1]


@pytest.fixture(scope="module")
def spec_generators(spec_eos):
  kw = dict(max_prompt_len=P, max_new_tokens=N, eos_id=spec_eos, pad_id=PAD)
  return Generator(MTP_CFG, **kw), SpeculativeGenerator(MTP_CFG, **kw)


@pytest.mark.parametrize("weights", ["random", "half", "exact_drafter", "wrong_drafter"])
def test_mtp_speculative_decoding_returns_greedy_tokens(weights, mtp_variables, spec_generators):
  variables = {
    "random": mtp_variables,
    "half": _with_drafter(mtp_variables, 1.0, 1.0),
    "exact_drafter": _with_drafter(mtp_variables, 0.0, 1.0),
    "wrong_drafter": _with_drafter(mtp_variables, 0.0, -1.0),
  }[weights]
  plain, speculative = spec_generators
  prompts, lengths = pad_prompts(SPEC_PROMPTS, P, PAD)
  want = plain(variables, prompts, lengths, jax.random.key(0), SamplingConfig(temperature=0))
  got = speculative(variables, prompts, lengths)
  for field in ("tokens", "mask", "lengths"):
    np.testing.assert_array_equal(getattr(got.generation, field), getattr(want, field), field)
  np.testing.assert_allclose(got.generation.logprobs, want.logprobs, atol=1e-5, rtol=0)

  drafted = np.asarray(got.drafts) >= 0
  right = drafted & (np.asarray(got.drafts) == np.asarray(got.generation.tokens))
  np.testing.assert_array_equal(got.proposed, drafted.sum(axis=1))
  np.testing.assert_array_equal(got.accepted, right.sum(axis=1))
  rate = float(got.acceptance_rate)
  assert 0.0 <= rate <= 1.0 and rate == pytest.approx(right.sum() / drafted.sum())
  # Each verify step emits two tokens after an accepted draft, one otherwise.
  need = np.asarray(want.lengths) - 1
  if weights == "exact_drafter":
    assert rate == 1.0
    np.testing.assert_array_equal(got.proposed, (need + 1) // 2)
  if weights == "wrong_drafter":
    assert rate == 0.0
    np.testing.assert_array_equal(got.proposed, need)
  assert int(got.steps) == int(np.max(got.proposed))
  if weights == "half":
    assert 0.0 < rate < 1.0 and len(set(np.asarray(got.accepted).tolist())) > 1
    assert int(np.min(want.lengths)) < N  # some row stopped at EOS


def test_mtp_drafts_are_the_training_forwards_mtp_predictions(mtp_variables, spec_generators):
  """Each draft is the argmax of the full (uncached) forward's MTP depth 1 at the position two
  before the drafted token: the MTP's own cache, holes included, matches training."""
  variables = _with_drafter(mtp_variables, 1.0, 1.0)
  prompts, lengths = pad_prompts(SPEC_PROMPTS, P, PAD)
  got = spec_generators[1](variables, prompts, lengths)
  checked = 0
  for i, prompt in enumerate(SPEC_PROMPTS):
    n = int(got.generation.lengths[i])
    buffer = np.zeros((1, P + N), np.int32)
    buffer[0, : len(prompt) + n] = prompt + got.generation.tokens[i, :n].tolist()
    _, mtp_logits = _full_mtp_forward(variables, buffer)
    want = np.asarray(jnp.argmax(mtp_logits[0, 0], axis=-1))
    for k in np.flatnonzero(np.asarray(got.drafts[i]) >= 0):
      assert int(got.drafts[i, k]) == int(want[len(prompt) + k - 2]), (i, k)
      checked += 1
  assert checked == int(got.proposed.sum())


def test_speculative_decoding_needs_an_mtp_module():
  with pytest.raises(ValueError, match="^num_nextn_predict_layers: "):
    SpeculativeGenerator(CFG, max_prompt_len=P, max_new_tokens=N, eos_id=EOS)
