"""Attention over MLA's absorbed cache (the latent itself), for decode-size queries.

Dims (r1jax/layers/mla.py's letters): b batch, s query, h heads, t key, c kv latent, r rope dim,
d the query's nope dims, v the value head dims; wkv_b [c, h, d + v] holds W^UK then W^UV.

  q_latent = `bshd,chd->bshc`(q_nope, wkv_b[..., :d])                   (W^UK folded in)
  scores   = (`bshc,btc->bsht`(q_latent, latent) + `bshr,btr->bsht`(q_rope, rope_key)) * scale
  probs    = softmax over t of scores, -1e30 where ~mask           (float32)
  out      = `bshc,chv->bshv`(`bsht,btc->bshc`(probs, latent), wkv_b[..., d:])   [b, s, h, v]

`latent_attention_reference` is that, in jnp (`latent_core_reference` the part between the
folds). On XLA:CPU, for float32 decode steps (s <= MAX_KERNEL_QUERIES), `latent_attention` runs
the fused C++ kernel `latent_attention.cc` instead: the query fold, one pass over each key block
for all heads (online softmax, the block folded into the output while in L1), the value fold,
rows and key chunks spread over XLA's intra-op threads. The reason: with few heads the scores
are a skinny product against the transposed latent, which XLA:CPU's dot kernels run far below
the machine's rate (on `small` at 4 x 4096 keys, 2-core VM: ~2.6 ms per layer against the
kernel's ~0.7, folds included, experiments/benchmarks/decode.py), and its dots took ~0.12 ms a
layer for the two folds' 0.5 MiB, against ~0.07 in the kernel.
Other platforms lower the reference (the choice is made per lowering platform, so
`jax.export(..., platforms=("tpu",))` on a CPU host is clean).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.cpu_kernels import build
from r1jax.layers.common import masked_softmax

_TARGET = "r1jax_latent_attention"
# Query rows per batch row up to which the kernel runs (decode, speculative verification);
# longer chunks (prefill) are real matrix products, where XLA's dots do well.
MAX_KERNEL_QUERIES = 8


def latent_core_reference(q_latent, q_rope, latent, rope_key, mask, scale: float):
  """The attention over the latent, between the folds: [b, s, h, c] in latent.dtype.

  Args:
    q_latent: [b, s, h, c] queries folded through W^UK.
    q_rope: [b, s, h, r] roped queries.
    latent: [b, t, c] cached normalised latents.
    rope_key: [b, t, r] cached roped shared keys.
    mask: [b, s, t] bool, True where the query attends to the key.
    scale: the softmax scale.
  """
  scores = jnp.einsum("bshc,btc->bsht", q_latent, latent)
  scores += jnp.einsum("bshr,btr->bsht", q_rope, rope_key)
  probs = masked_softmax(scores * scale, mask).astype(latent.dtype)
  return jnp.einsum("bsht,btc->bshc", probs, latent)


def latent_attention_reference(q_nope, q_rope, latent, rope_key, mask, wkv_b, scale: float):
  """The absorbed attention in jnp (the module docstring's formulas): [b, s, h, v].

  Args:
    q_nope: [b, s, h, d] the queries' non-rotary part.
    q_rope, latent, rope_key, mask, scale: as `latent_core_reference`'s.
    wkv_b: [c, h, d + v] the latent's up-projection, W^UK then W^UV.
  """
  d = q_nope.shape[-1]
  q_latent = jnp.einsum("bshd,chd->bshc", q_nope, wkv_b[..., :d])
  out = latent_core_reference(q_latent, q_rope, latent, rope_key, mask, scale)
  return jnp.einsum("bshc,chd->bshd", out, wkv_b[..., d:])


def kernel_applies(q_nope, q_rope, latent, rope_key, wkv_b) -> bool:
  """Whether the C++ kernel takes these operands: float32, decode-size s, and the register
  tiles' multiples (h of 4, c of 16, r, d and v of 8)."""
  _, s, h, d = q_nope.shape
  r, c, v = q_rope.shape[-1], latent.shape[-1], wkv_b.shape[-1] - d
  f32 = all(x.dtype == jnp.float32 for x in (q_nope, q_rope, latent, rope_key, wkv_b))
  multiples = h % 4 == 0 and c % 16 == 0 and r % 8 == 0 and d % 8 == 0 and v % 8 == 0
  return f32 and s <= MAX_KERNEL_QUERIES and multiples


def _kernel(q_nope, q_rope, latent, rope_key, mask, wkv_b, scale: float):
  out_shape = q_nope.shape[:3] + (wkv_b.shape[-1] - q_nope.shape[-1],)
  call = jax.ffi.ffi_call(
    _TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
  )
  return call(q_nope, q_rope, latent, rope_key, mask, wkv_b, scale=np.float32(scale))


def latent_attention(q_nope, q_rope, latent, rope_key, mask, wkv_b, scale: float, use_kernel=True):
  """`latent_attention_reference`'s result; through the C++ kernel when lowering for CPU,
  `use_kernel`, `kernel_applies` and the kernel built here (`build.load`)."""
  args = (q_nope, q_rope, latent, rope_key, mask, wkv_b)
  reference = lambda *a: latent_attention_reference(*a, scale)
  if not (use_kernel and kernel_applies(q_nope, q_rope, latent, rope_key, wkv_b)):
    return reference(*args)
  if not build.load("latent_attention.cc", "R1jaxLatentAttention", _TARGET):
    return reference(*args)
  return build.on_cpu(lambda *a: _kernel(*a, scale), reference)(*args)
