"""r1jax's C++ XLA:CPU kernels against their jnp references, and how they are built and chosen.

latent_attention: `bshd,chd->bshc`, scores `bshc,btc->bsht` + `bshr,btr->bsht`, masked softmax,
  `bsht,btc->bshc`, `bshc,chd->bshd`.
routed_experts (decode sizes): per (token, expert) pair SwiGLU, weighted sum over k.
"""

from __future__ import annotations

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from r1jax.config import ModelConfig
from r1jax.cpu_kernels import build
from r1jax.cpu_kernels.latent_attention import (
  latent_attention,
  latent_attention_reference,
)
from r1jax.cpu_kernels.routed_experts import routed_experts_decode
from r1jax.cpu_kernels.small_matmul import small_matmul
from r1jax.layers.experts import _pairwise_experts, routed_experts_dense_reference
from r1jax.model import Transformer

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None, reason="no C++ compiler here: the kernels fall back to XLA"
)


def _attention_inputs(b, s, h, c, r, t, d=16, v=16, seed=0, mask_p=0.8):
  """q_nope, q_rope, latent, rope_key, mask, wkv_b; wkv_b scaled so that the folded queries
  are ~N(0, 1), as the latent."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  mask = rng.random((b, s, t)) < mask_p
  wkv_b = (f(c, h, d + v) / np.sqrt(d)).astype(np.float32)
  return f(b, s, h, d), f(b, s, h, r), f(b, t, c), f(b, t, r), mask, wkv_b


def _attention_float64(q, qr, lat, kpe, mask, wkv_b, scale):
  """The reference's math in numpy float64: what both float32 forms are measured against."""
  q, qr, lat, kpe, wkv_b = (np.asarray(x, np.float64) for x in (q, qr, lat, kpe, wkv_b))
  d = q.shape[-1]
  q = np.einsum("bshd,chd->bshc", q, wkv_b[..., :d])
  scores = np.einsum("bshc,btc->bsht", q, lat) + np.einsum("bshr,btr->bsht", qr, kpe)
  scores = np.where(mask[:, :, None, :], scores * scale, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  out = np.einsum("bsht,btc->bshc", probs / probs.sum(-1, keepdims=True), lat)
  return np.einsum("bshc,chv->bshv", out, wkv_b[..., d:])


def _assert_as_accurate(got, reference, exact, slack=2.0):
  """got's worst error against `exact` is within `slack` times the reference's (float32
  rounding differs with the order of the sums; neither is the exact answer)."""
  err = np.abs(np.asarray(got, np.float64) - exact).max()
  ref_err = np.abs(np.asarray(reference, np.float64) - exact).max()
  assert err <= slack * ref_err + 1e-7, (err, ref_err)


def _lowered(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


def test_kernels_build_here():
  """A compiler is here, so both must build (CI fails rather than falling back silently)."""
  assert build.load("latent_attention.cc", "R1jaxLatentAttention", "r1jax_latent_attention")
  assert build.load("routed_experts.cc", "R1jaxRoutedExperts", "r1jax_routed_experts")
  assert build.load("small_matmul.cc", "R1jaxSmallMatmul", "r1jax_small_matmul")


@pytest.mark.parametrize(
  "b,s,h,c,r,t,d,v",
  [
    (4, 1, 8, 128, 32, 4096, 64, 64),  # the decode benchmark's shape (`small`'s constants)
    (1, 1, 4, 16, 8, 1, 16, 16),  # one key; `tiny`'s dims
    (2, 3, 4, 32, 8, 37, 8, 72),  # several queries, a short last block and key tile
    (3, 2, 8, 16, 16, 300, 16, 16),
    (1, 8, 12, 48, 8, 1000, 24, 8),  # 12 heads: two groups of 8 lanes, the second half empty
    (1, 1, 8, 512, 64, 700, 128, 128),  # DeepSeek-V3's constants; one row in chunks
  ],
)
def test_latent_attention_matches_the_reference(b, s, h, c, r, t, d, v):
  args = _attention_inputs(b, s, h, c, r, t, d, v)
  fn = jax.jit(lambda *a: latent_attention(*a, 0.3))
  assert "r1jax_latent_attention" in _lowered(fn, *args)
  got = fn(*args)
  want = latent_attention_reference(*args, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  _assert_as_accurate(got, want, _attention_float64(*args, 0.3))


def test_fully_masked_rows_average_every_key_as_the_reference():
  q, qr, lat, kpe, mask, wkv_b = args = _attention_inputs(2, 2, 4, 16, 8, 70)
  mask[0, 1] = False  # no key at all: the reference's -1e30 scores give a uniform softmax
  mask[1, 0] = False
  mask[1, 0, 69] = True  # only the last key
  got = latent_attention(*args, 0.5)
  want = latent_attention_reference(*args, 0.5)
  _assert_as_accurate(got, want, _attention_float64(*args, 0.5))
  unfold = lambda o: np.einsum("c,chv->hv", o.astype(np.float64), wkv_b[..., 16:])
  np.testing.assert_allclose(got[0, 1], unfold(lat[0].mean(0)), atol=1e-6)
  np.testing.assert_allclose(got[1, 0], unfold(lat[1, 69]), atol=1e-6)


def test_latent_attention_falls_back_where_the_kernel_does_not_apply():
  q, qr, lat, kpe, mask, wkv_b = _attention_inputs(1, 9, 4, 16, 8, 20)  # 9 queries: a prefill
  fn = lambda *a: latent_attention(*a, 0.3)
  assert "r1jax_latent_attention" not in _lowered(fn, q, qr, lat, kpe, mask, wkv_b)
  one = (q[:, :1], qr[:, :1], lat, kpe, mask[:, :1], wkv_b)
  assert "r1jax_latent_attention" in _lowered(fn, *one)
  bf16 = [x.astype(jnp.bfloat16) if x.dtype == np.float32 else x for x in one]
  assert "r1jax_latent_attention" not in _lowered(fn, *bf16)
  odd_value = (*one[:5], np.concatenate([wkv_b, wkv_b[..., :4]], -1))  # v = 20: not 8's
  assert "r1jax_latent_attention" not in _lowered(fn, *odd_value)
  off = lambda *a: latent_attention(*a, 0.3, use_kernel=False)
  assert "r1jax_latent_attention" not in _lowered(off, *one)


def test_export_for_tpu_lowers_no_cpu_kernel():
  args = _attention_inputs(2, 1, 4, 16, 8, 40)
  text = export.export(jax.jit(lambda *a: latent_attention(*a, 0.3)), platforms=("tpu",))(
    *args
  ).mlir_module()
  assert "r1jax_latent_attention" not in text and "dot_general" in text


def test_latent_attention_gradient_is_the_references():
  q, qr, lat, kpe, mask, wkv_b = _attention_inputs(2, 1, 4, 16, 8, 33)
  loss = lambda fn: lambda q, lat, w: jnp.sum(jnp.sin(fn(q, qr, lat, kpe, mask, w, 0.3)))
  got = jax.grad(loss(latent_attention), argnums=(0, 1, 2))(q, lat, wkv_b)
  want = jax.grad(loss(latent_attention_reference), argnums=(0, 1, 2))(q, lat, wkv_b)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _expert_inputs(t, k, d, f, e, seed=0, drop=False):
  rng = np.random.default_rng(seed)
  experts = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  experts[0, 0] = experts[1, 1] = 3  # two tokens share an expert (one group, two rows)
  if drop:
    experts[2, 0] = e  # "no expert here" (another shard's pair)
  weights = rng.random((t, k)).astype(np.float32)
  x = rng.standard_normal((t, d)).astype(np.float32)
  wi = (rng.standard_normal((e, d, 2 * f)) * d**-0.5).astype(np.float32)
  wo = (rng.standard_normal((e, f, d)) * f**-0.5).astype(np.float32)
  return tuple(map(jnp.asarray, (x, weights, experts, wi, wo)))


@pytest.mark.parametrize("t,k,d,f,e", [(4, 6, 512, 256, 64), (3, 2, 16, 8, 8), (7, 3, 24, 12, 16)])
def test_routed_experts_match_the_pair_loop_and_the_dense_reference(t, k, d, f, e):
  args = _expert_inputs(t, k, d, f, e)
  fn = jax.jit(lambda *a: routed_experts_decode(*a, reference=_pairwise_experts))
  assert "r1jax_routed_experts" in _lowered(fn, *args)
  got = fn(*args)
  np.testing.assert_allclose(got, _pairwise_experts(*args), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, routed_experts_dense_reference(*args), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got, fn(*args))  # thread scheduling does not change the sums


def test_routed_experts_skip_the_drop_id():
  x, weights, experts, wi, wo = _expert_inputs(4, 2, 16, 8, 8, drop=True)
  got = routed_experts_decode(x, weights, experts, wi, wo, reference=_pairwise_experts)
  kept = jnp.where(experts < 8, experts, 0), jnp.where(experts < 8, weights, 0)
  want = routed_experts_dense_reference(x, kept[1], kept[0], wi, wo)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_routed_experts_gradient_is_the_references():
  x, weights, experts, wi, wo = _expert_inputs(3, 2, 16, 8, 8)

  def loss(fn):
    return lambda x, wi: jnp.sum(jnp.cos(fn(x, weights, experts, wi, wo)))

  kernel = lambda *a: routed_experts_decode(*a, reference=_pairwise_experts)
  got = jax.grad(loss(kernel), argnums=(0, 1))(x, wi)
  want = jax.grad(loss(_pairwise_experts), argnums=(0, 1))(x, wi)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "spec,x_shape,w_shape,n_in",
  [
    ("bsm,mv->bsv", (4, 1, 512), (512, 8192), 1),  # the `small` LM head at decode
    ("...m,mgf->...gf", (2, 3, 130), (130, 2, 13), 1),  # a short last row block, odd columns
    ("bshd,hdm->bsm", (1, 8, 4, 16), (4, 16, 24), 2),  # M = 8 rows, two contracted dims
    ("bsm,mq->bsq", (1, 1, 5), (5, 3), 1),
  ],
)
def test_small_matmul_matches_the_einsum(spec, x_shape, w_shape, n_in):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = (rng.standard_normal(w_shape) / np.sqrt(x_shape[-1])).astype(np.float32)
  fn = jax.jit(lambda x, w: small_matmul(spec, x, w, n_in=n_in))
  assert "r1jax_small_matmul" in _lowered(fn, x, w)
  got, want = fn(x, w), jnp.einsum(spec, x, w)
  exact = np.einsum(spec, x.astype(np.float64), w.astype(np.float64))
  assert got.shape == want.shape
  _assert_as_accurate(got, want, exact)
  np.testing.assert_array_equal(got, fn(x, w))  # the chunks' partial sums add in a fixed order


def test_small_matmul_leaves_training_sizes_to_the_einsum():
  x, w = np.ones((3, 3, 16), np.float32), np.ones((16, 4), np.float32)  # 9 rows
  assert "r1jax_small_matmul" not in _lowered(lambda x, w: small_matmul("bsm,mv->bsv", x, w), x, w)
  one = x[:1, :1]
  off = lambda x, w: small_matmul("bsm,mv->bsv", x, w, use_kernel=False)
  assert "r1jax_small_matmul" not in _lowered(off, one, w)


def test_small_matmul_gradient_is_the_einsums():
  rng = np.random.default_rng(2)
  x, w = rng.standard_normal((2, 1, 12)).astype(np.float32), rng.standard_normal((12, 20))
  w = w.astype(np.float32)
  loss = lambda fn: lambda x, w: jnp.sum(jnp.tanh(fn("bsm,mv->bsv", x, w)))
  got = jax.grad(loss(small_matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, w)
  for g, v in zip(got, want, strict=True):
    np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-6)


def _decode_logits(cfg, steps=6):
  """Logits of a prefill of 5 tokens then `steps` single-token decode steps, batch 2."""
  model = Transformer(cfg, decode=True)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 5 + steps)).astype(np.int32)
  variables = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  cache = model.init(jax.random.key(0), jnp.zeros((2, 5 + steps), jnp.int32))["cache"]
  step = jax.jit(lambda cache, t: model.apply({**variables, "cache": cache}, t, mutable=["cache"]))
  logits, state = step(cache, tokens[:, :5])
  out = [logits[:, -1]]
  for i in range(5, 5 + steps):
    logits, state = step(state["cache"], tokens[:, i : i + 1])
    out.append(logits[:, -1])
  return np.stack(out), jax.jit(step).lower(cache, tokens[:, :1]).as_text()


def test_decoding_with_and_without_the_kernels_gives_the_same_logits():
  cfg = ModelConfig.from_preset("tiny")
  with_kernels, text = _decode_logits(cfg)
  without, text_off = _decode_logits(ModelConfig.from_preset("tiny", cpu_kernels=False))
  for target in ("r1jax_latent_attention", "r1jax_routed_experts", "r1jax_small_matmul"):
    assert target in text, target
  assert "r1jax_" not in text_off
  np.testing.assert_allclose(with_kernels, without, rtol=1e-5, atol=1e-5)


def test_a_missing_compiler_is_one_warning_and_the_xla_path(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", "no-such-compiler-r1jax")
  monkeypatch.setenv("R1JAX_KERNEL_CACHE", str(tmp_path))
  build.load.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not build.load("latent_attention.cc", "R1jaxLatentAttention", "r1jax_latent_attention")
    assert "no C++ compiler 'no-such-compiler-r1jax'" in caplog.text
    args = _attention_inputs(1, 1, 4, 16, 8, 9)
    assert "r1jax_latent_attention" not in _lowered(lambda *a: latent_attention(*a, 0.3), *args)
    assert not list(tmp_path.iterdir())
  finally:
    build.load.cache_clear()


def test_a_built_kernel_is_reused_from_the_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("R1JAX_KERNEL_CACHE", str(tmp_path))
  first = build._build(build._SOURCES / "routed_experts.cc")
  stamp = first.stat().st_mtime_ns
  assert build._build(build._SOURCES / "routed_experts.cc") == first
  assert first.stat().st_mtime_ns == stamp and [p.name for p in tmp_path.iterdir()] == [first.name]
