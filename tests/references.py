"""Independent float64 numpy re-derivations of the DeepSeek-V3 math, straight from SPEC.md.

Nothing here imports r1jax code paths beyond reading parameter arrays, so a bug in the library
cannot hide in its own reference.
"""

from __future__ import annotations

import numpy as np


def _assert_no_near_tie(descending, cut):
  """float32 and float64 scores must agree on which side of the cut each entry falls.

  The gap is relative: float32 scores are good to ~1e-7 of their size, and softmax scores over
  many experts are small (~1/E), so an absolute bound would reject most random draws.
  """
  if cut < len(descending) and np.isfinite(descending[cut]):
    gap = descending[cut - 1] - descending[cut]
    assert gap > 1e-5 * abs(descending[cut - 1]), "near-tie: pick another seed"


def np_route(logits, bias, *, top_k, score_func, n_group, topk_group, group_score, norm, scale):
  """The gate of SPEC 5.2/5.3, one token at a time, in float64: (weights [T, K], experts [T, K]).

  Experts come in descending order of selection score; a near-tie at a cut fails loudly.
  """
  weights, experts = [], []
  for row in np.asarray(logits, np.float64):
    if score_func == "sigmoid":
      s = 1.0 / (1.0 + np.exp(-row))
    else:
      s = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    sel = s if bias is None else s + np.asarray(bias, np.float64)
    if n_group > 1:
      groups = sel.reshape(n_group, -1)
      if group_score == "top2sum":
        group_scores = [sum(sorted(g)[-2:]) for g in groups]
      else:
        group_scores = [max(g) for g in groups]
      ranked = sorted(range(n_group), key=lambda g: -group_scores[g])
      _assert_no_near_tie([group_scores[g] for g in ranked], topk_group)
      best = ranked[:topk_group]
      sel = np.concatenate(
        [g if i in best else np.full_like(g, -np.inf) for i, g in enumerate(groups)]
      )
    ranked = sorted(range(len(sel)), key=lambda e: -sel[e])
    _assert_no_near_tie([sel[e] for e in ranked], top_k)
    chosen = ranked[:top_k]
    w = s[chosen]
    if norm:
      w = w / (w.sum() + 1e-20)
    weights.append(w * scale)
    experts.append(chosen)
  return np.array(weights), np.array(experts)


def np_rms_norm(x, w, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w, np.float64)


def np_rope_interleaved(x, positions, inv_freq):
  """x [b, s, ..., r]: consecutive pairs rotated as complex numbers (the official code)."""
  angles = positions.astype(np.float32)[..., None] * inv_freq
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles.astype(np.float64))
  return np.stack([z.real, z.imag], -1).reshape(x.shape)


def np_mla(p, x, positions, cfg, inv_freq, scale, window=0):
  """Naive MLA of SPEC 3.2 on params `p` (the r1jax layout: [in, out] with per-head axes); with
  window W > 0 query i sees keys i - W < j <= i (the banded causal mask)."""
  g = lambda name: np.asarray(p[name], np.float64)
  x = np.asarray(x, np.float64)
  if cfg.q_lora_rank:
    q = np.einsum("bsq,qhd->bshd", np_rms_norm(x @ g("wq_a"), g("q_norm_scale")), g("wq_b"))
  else:
    q = np.einsum("bsm,mhd->bshd", x, g("wq"))
  nope = cfg.qk_nope_head_dim
  q_pe = np_rope_interleaved(q[..., nope:], positions, inv_freq)
  kv = x @ g("wkv_a")
  c = np_rms_norm(kv[..., : cfg.kv_lora_rank], g("kv_norm_scale"))
  k_pe = np_rope_interleaved(kv[..., cfg.kv_lora_rank :], positions, inv_freq)
  up = np.einsum("btc,chd->bthd", c, g("wkv_b"))
  k = np.concatenate([up[..., :nope], np.broadcast_to(k_pe[:, :, None], q_pe.shape)], -1)
  qf = np.concatenate([q[..., :nope], q_pe], -1)
  scores = np.einsum("bshd,bthd->bsht", qf, k) * scale
  s = x.shape[1]
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  band = (j <= i) & ((i - j < window) if window else True)
  scores = np.where(band[None, :, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bsht,bthd->bshd", probs, up[..., nope:])
  return np.einsum("bshd,hdm->bsm", out, g("wo"))
