"""Token merging and inflation (r1jax/layers/token_merge.py): the selection rule against a plain
loop, merging against a numpy size-weighted mean, identity with zero merges, the model's
causality with merging on, and fewer tokens through the merged band."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig, Transformer
from r1jax.layers.token_merge import (
  Inflate,
  merge_count,
  merge_tokens,
  select_riders,
)
from tests.one_batch import train_on_one_batch

MERGING = ModelConfig.from_preset(
  "tiny", scan_layers=False, merge_ratio=0.25, merge_layer=1, inflate_layer=2
)


def np_riders(sim, seg, count, threshold):
  """The rule of the module docstring as a plain loop over each row."""
  b, s = sim.shape
  seg = np.zeros((b, s), int) if seg is None else np.asarray(seg)
  out = np.zeros((b, s), bool)
  for row in range(b):
    cand = [1 <= p <= s - 2 for p in range(s)]
    elig = [cand[p] and seg[row, p - 1] == seg[row, p] == seg[row, p + 1] for p in range(s)]
    n, chosen, k = sum(elig), 0, 0
    for p in range(s):
      k += elig[p]
      need = count - chosen
      if need <= 0:
        break
      pace = count * k // max(n, 1)
      wanted = elig[p] and (sim[row, p] >= threshold or chosen < pace or sum(elig[p:]) <= need)
      if wanted or (cand[p] and s - 1 - p <= need):
        out[row, p] = True
        chosen += 1
  return out


@pytest.mark.parametrize("threshold", [-1.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("packed", [False, True])
def test_selection_follows_the_rule_exactly_r_per_row(threshold, packed):
  rng = np.random.default_rng(0)
  sim = rng.uniform(-1, 1, (4, 40)).astype(np.float32)
  seg = np.cumsum(rng.uniform(size=(4, 40)) < 0.15, axis=1) + 1 if packed else None
  count = 9
  got = np.asarray(jax.jit(select_riders, static_argnums=(2, 3))(sim, seg, count, threshold))
  np.testing.assert_array_equal(got, np_riders(sim, seg, count, threshold))
  assert (got.sum(axis=1) == count).all() and not got[:, [0, -1]].any()
  if threshold == -1.0 and not packed:  # everything passes: the first r candidates
    assert got[:, 1 : count + 1].all()
  if packed:  # enough candidates here: no rider at a document boundary
    boundary = np.zeros_like(got)
    boundary[:, 1:] |= seg[:, 1:] != seg[:, :-1]
    boundary[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    assert not (got & boundary).any()


def test_a_row_with_too_few_candidates_still_merges_exactly_r():
  seg = np.array([[1, 1, 2, 2, 3, 3, 4, 4, 5, 5]])  # two-token documents: no candidate at all
  got = np.asarray(select_riders(np.zeros((1, 10), np.float32), seg, 3, 0.5))
  assert got.sum() == 3 and not got[:, [0, -1]].any()


def test_each_decision_depends_only_on_the_past():
  """Changing the similarities after position p never changes the riders at or before p."""
  rng = np.random.default_rng(1)
  sim = rng.uniform(-1, 1, (2, 32)).astype(np.float32)
  base = np.asarray(select_riders(sim, None, 8, 0.5))
  for p in (3, 10, 20, 29):
    changed = sim.copy()
    changed[:, p + 1 :] = rng.uniform(-1, 1, (2, 31 - p))
    np.testing.assert_array_equal(
      np.asarray(select_riders(changed, None, 8, 0.5))[:, : p + 1], base[:, : p + 1]
    )


def test_merge_is_the_size_weighted_mean_at_the_kept_tokens_position():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 8, 5)).astype(np.float32)
  riders = np.zeros((2, 8), bool)
  riders[0, [2, 3, 5]] = True  # a run of two riders: slot of size 3
  riders[1, [1, 4, 6]] = True
  positions = np.broadcast_to(np.arange(8) + 100, (2, 8))
  merged, merged_pos, _, state = merge_tokens(x, positions, None, riders, 5)
  for row in range(2):
    kept = np.flatnonzero(~riders[row])
    start = 0
    for slot, k in enumerate(kept):
      members = np.arange(start, k + 1)  # the riders before k, then k
      np.testing.assert_allclose(merged[row, slot], x[row, members].mean(0), rtol=1e-6)
      assert state.sizes[row, slot] == len(members) and merged_pos[row, slot] == 100 + k
      start = k + 1
    # A kept token reads its own slot; a rider the last kept slot before it (never its own).
    for p in range(8):
      assert state.source[row, p] == np.sum(~riders[row, : p + 1]) - 1


def test_zero_merges_is_the_identity_and_merges_come_back_through_an_identity_band():
  x = jax.random.normal(jax.random.key(0), (2, 12, MERGING.hidden_size))
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  merged, merged_pos, _, state = _state(x, positions, 0)
  inflate = Inflate(MERGING)
  gate = inflate.init(jax.random.key(0), merged, x, state)
  np.testing.assert_array_equal(merged, x)
  np.testing.assert_array_equal(merged_pos, positions)
  np.testing.assert_array_equal(inflate.apply(gate, merged, x, state), x)
  merged, _, _, state = _state(x, positions, 4)
  assert merged.shape == (2, 8, MERGING.hidden_size)
  np.testing.assert_allclose(inflate.apply(gate, merged, x, state), x, rtol=1e-6, atol=1e-6)


def _state(x, positions, count):
  riders = select_riders(jnp.zeros(x.shape[:2]), None, count, 0.5)
  return merge_tokens(x, positions, None, riders, x.shape[1] - count)


@pytest.mark.parametrize("t", [0, 5, 9, 14])
def test_causality_holds_with_merging_on(t):
  """The model-core causality test with a quarter of the tokens merged away in layer 1."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, MERGING.vocab_size)
  model = Transformer(MERGING)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  apply = jax.jit(lambda v, t: model.apply(v, t, mtp=True))
  changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] * 7 + 3) % MERGING.vocab_size)
  a, a_mtp = apply(variables, tokens)
  b, b_mtp = apply(variables, changed)
  np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
  assert float(jnp.abs(a[:, t + 1 :] - b[:, t + 1 :]).max()) > 1e-4
  depth = MERGING.num_nextn_predict_layers
  np.testing.assert_array_equal(a_mtp[:, :, : t + 1 - depth], b_mtp[:, :, : t + 1 - depth])


def test_the_merged_band_sees_fewer_tokens_by_the_ratio():
  """The routing record of each MoE layer: s tokens outside the band, s - floor(ratio s) in it."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, MERGING.vocab_size)
  model = Transformer(MERGING)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  _, record = jax.jit(lambda v, t: model.apply(v, t, mutable=["routing"]))(variables, tokens)
  seen = {
    name: layer["moe"]["expert_ids"].shape[1]
    for name, layer in record["routing"]["moe_layers"].items()
  }
  assert merge_count(16, 0.25) == 4
  assert seen == {"layer_0": 12, "layer_1": 16}  # model layers 1 (in the band) and 2 (after)


def test_a_ratio_that_merges_nothing_gives_the_unmerged_model():
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, MERGING.vocab_size)
  tiny = ModelConfig.from_preset("tiny", scan_layers=False)
  variables = jax.jit(Transformer(tiny).init)(jax.random.key(1), tokens)
  want = jax.jit(Transformer(tiny).apply)(variables, tokens)
  nothing = ModelConfig.from_preset("tiny", scan_layers=False, merge_ratio=0.05)  # floor(0.8) = 0
  params = dict(variables["params"], inflate={"gate": jnp.ones(tiny.hidden_size)})
  got = jax.jit(Transformer(nothing).apply)({**variables, "params": params}, tokens)
  np.testing.assert_array_equal(got, want)


def test_a_model_with_merging_trains():
  """One fixed batch: the loss falls by more than half in 60 steps, the gate learns."""
  model = Transformer(MERGING)
  tokens = jax.random.randint(jax.random.key(3), (4, 32), 0, MERGING.vocab_size)
  state, losses, _ = train_on_one_batch(model, tokens, 60)
  assert min(losses[-5:]) < 0.5 * losses[0], (losses[0], losses[-5:])
  assert float(jnp.abs(state.params["inflate"]["gate"] - 1).max()) > 1e-4


def test_decoding_a_merging_model_is_refused_with_the_field_named():
  decoder = Transformer(MERGING, decode=True)
  with pytest.raises(ValueError, match="^merge_ratio: token merging is a training"):
    jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
