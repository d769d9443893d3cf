"""Attention over MLA's absorbed cache (the latent itself), for decode-size queries.

Dims (r1jax/layers/mla.py's letters): b batch, s query, h heads, t key, c kv latent, r rope dim.

  scores = (`bshc,btc->bsht`(q_latent, latent) + `bshr,btr->bsht`(q_rope, rope_key)) * scale
  probs  = softmax over t of scores, -1e30 where ~mask          (float32)
  out    = `bsht,btc->bshc`(probs, latent)                       [b, s, h, c]

`latent_attention_reference` is that, in jnp. On XLA:CPU, for float32 decode steps (s <=
MAX_KERNEL_QUERIES), `latent_attention` runs the fused C++ kernel `latent_attention.cc` instead:
one pass over each key block for all heads, online softmax, the block folded into the output
while in L1, rows and key chunks spread over XLA's intra-op threads. The reason: with few heads
the scores are a skinny product against the transposed latent, which XLA:CPU's dot kernels run
far below the machine's rate (on `small` at 4 x 4096 keys, 2-core VM: ~2.6 against ~0.85 ms per
layer, experiments/benchmarks/decode.py). Other platforms lower the reference (the choice is
made per lowering platform, so `jax.export(..., platforms=("tpu",))` on a CPU host is clean).
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


def latent_attention_reference(q_latent, q_rope, latent, rope_key, mask, scale: float):
  """The absorbed attention core in jnp (the module docstring's formulas).

  Args:
    q_latent: [b, s, h, c] queries folded through W^UK.
    q_rope: [b, s, h, r] roped queries.
    latent: [b, t, c] cached normalised latents.
    rope_key: [b, t, r] cached roped shared keys.
    mask: [b, s, t] bool, True where the query attends to the key.
    scale: the softmax scale.

  Returns:
    [b, s, h, c] in latent.dtype.
  """
  scores = jnp.einsum("bshc,btc->bsht", q_latent, latent)
  scores += jnp.einsum("bshr,btr->bsht", q_rope, rope_key)
  probs = masked_softmax(scores * scale, mask).astype(latent.dtype)
  return jnp.einsum("bsht,btc->bshc", probs, latent)


def kernel_applies(q_latent, q_rope, latent, rope_key) -> bool:
  """Whether the C++ kernel takes these operands: float32, decode-size s, and the register
  tiles' multiples (h of 4, c of 16, r of 8)."""
  _, s, h, c = q_latent.shape
  r = q_rope.shape[-1]
  f32 = all(x.dtype == jnp.float32 for x in (q_latent, q_rope, latent, rope_key))
  return f32 and s <= MAX_KERNEL_QUERIES and h % 4 == 0 and c % 16 == 0 and r % 8 == 0


def _kernel(q_latent, q_rope, latent, rope_key, mask, scale: float):
  call = jax.ffi.ffi_call(
    _TARGET, jax.ShapeDtypeStruct(q_latent.shape, jnp.float32), vmap_method="sequential"
  )
  return call(q_latent, q_rope, latent, rope_key, mask, scale=np.float32(scale))


def latent_attention(q_latent, q_rope, latent, rope_key, mask, scale: float, use_kernel=True):
  """`latent_attention_reference`'s result; through the C++ kernel when lowering for CPU,
  `use_kernel`, `kernel_applies` and the kernel built here (`build.load`)."""
  args = (q_latent, q_rope, latent, rope_key, mask)
  if not (use_kernel and kernel_applies(*args[:4])):
    return latent_attention_reference(*args, scale)
  if not build.load("latent_attention.cc", "R1jaxLatentAttention", _TARGET):
    return latent_attention_reference(*args, scale)
  op = build.on_cpu(lambda *a: _kernel(*a, scale), lambda *a: latent_attention_reference(*a, scale))
  return op(*args)
