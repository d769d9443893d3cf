"""Independent float64 numpy re-derivations of the DeepSeek-V3 math, straight from SPEC.md.

Nothing here imports r1jax code paths beyond reading parameter arrays, so a bug in the library
cannot hide in its own reference.
"""

from __future__ import annotations

import numpy as np


def np_gate(logits, bias, *, top_k, score_func, n_group, topk_group, group_score, norm, scale):
  """SPEC 5.2/5.3: returns (weights [T, K], experts [T, K]) with experts in descending order."""
  logits = np.asarray(logits, np.float64)
  if score_func == "sigmoid":
    s = 1.0 / (1.0 + np.exp(-logits))
  else:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    s = z / z.sum(-1, keepdims=True)
  sel = s + (0.0 if bias is None else np.asarray(bias, np.float64))
  t, e = s.shape
  if n_group > 1:
    grouped = sel.reshape(t, n_group, e // n_group)
    if group_score == "top2sum":
      gscore = np.sort(grouped, -1)[..., -2:].sum(-1)
    else:
      gscore = grouped.max(-1)
    keep = np.argsort(-gscore, axis=-1, kind="stable")[:, :topk_group]
    mask = np.zeros((t, n_group), bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    sel = np.where(np.repeat(mask, e // n_group, axis=1), sel, -np.inf)
  experts = np.argsort(-sel, axis=-1, kind="stable")[:, :top_k]
  weights = np.take_along_axis(s, experts, -1)
  if norm:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * scale, experts


def np_rms_norm(x, w, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w, np.float64)


def np_rope_interleaved(x, positions, inv_freq):
  """x [b, s, ..., r]: consecutive pairs rotated as complex numbers (the official code)."""
  angles = positions.astype(np.float32)[..., None] * inv_freq
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles.astype(np.float64))
  return np.stack([z.real, z.imag], -1).reshape(x.shape)


def np_mla(p, x, positions, cfg, inv_freq, scale):
  """Naive MLA of SPEC 3.2 on params `p` (the r1jax layout: [in, out] with per-head axes)."""
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
  scores = np.where(np.tril(np.ones((s, s), bool))[None, :, None, :], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bsht,bthd->bshd", probs, up[..., nope:])
  return np.einsum("bshd,hdm->bsm", out, g("wo"))
