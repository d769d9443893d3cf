"""RoPE/YaRN against SPEC.md section 4's numbers and a complex-number re-derivation."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import ModelConfig
from r1jax.layers.rope import apply_rope, inverse_frequencies, softmax_scale


def test_v3_yarn_frequencies_match_the_spec_table():
  cfg = ModelConfig.from_preset("v3_671b")
  theta = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  ratio = inverse_frequencies(cfg) / theta
  np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)  # pairs 0..10 unchanged
  expected_blend = [1 - 0.075 * (i - 10) for i in range(11, 23)]  # 0.925, 0.85, ..., 0.10
  np.testing.assert_allclose(ratio[11:23], expected_blend, rtol=1e-5)
  np.testing.assert_allclose(ratio[23:], 1 / 40, rtol=1e-6)  # pairs 23..31 interpolated
  assert inverse_frequencies(cfg)[-1] == pytest.approx(3.3338e-6, rel=1e-4)


def test_softmax_scales():
  assert softmax_scale(ModelConfig.from_preset("v3_671b")) == pytest.approx(0.13523378, rel=1e-7)
  assert softmax_scale(ModelConfig.from_preset("v2_lite")) == pytest.approx(0.1147214, rel=1e-6)
  plain = ModelConfig.from_preset("tiny", rope_type="default")
  assert softmax_scale(plain) == pytest.approx(plain.qk_head_dim**-0.5)


def test_interleaved_rope_is_a_complex_rotation_of_consecutive_pairs():
  cfg = ModelConfig.from_preset("v3_671b")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)
  pos = np.array([[0, 1, 7, 300, 4095], [9, 8, 7, 6, 100000]], np.int32)
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  z = x[..., 0::2].astype(np.float64) + 1j * x[..., 1::2]
  # Angles in float32, as the official code and transformers compute them (at position 1e5 the
  # float32 angle itself is off by ~6e-3 rad; the rotation around it must be exact).
  angles = pos[:, :, None, None].astype(np.float32) * inverse_frequencies(cfg)
  rot = np.exp(1j * angles.astype(np.float64))
  want = np.stack([(z * rot).real, (z * rot).imag], axis=-1).reshape(x.shape)
  np.testing.assert_allclose(out, want, atol=2e-4 * math.sqrt(1 + np.abs(want).max()))


def test_rotate_half_on_permuted_rows_equals_interleaved():
  """SPEC 4.2: permuting the rope rows [0,2,..,62,1,3,..,63] turns interleaved into rotate-half."""
  cfg = ModelConfig.from_preset("tiny")
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 6, 8)).astype(np.float32)
  pos = np.arange(6, dtype=np.int32)[None]
  interleaved = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])
  half_cfg = ModelConfig.from_preset("tiny", rope_interleave=False)
  half = np.asarray(apply_rope(jnp.asarray(x[..., perm]), jnp.asarray(pos), half_cfg))
  np.testing.assert_allclose(half, interleaved[..., perm], atol=1e-6)
