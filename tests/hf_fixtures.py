"""Tiny random transformers DeepSeek V2/V3 models for the checkpoint tests (tests/test_hf.py)."""

from __future__ import annotations

import torch
import transformers

# Shared tiny shapes: hidden 32, 4 heads, 8 routed experts of width 16, vocab 128.
_BASE = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  moe_intermediate_size=16,
  num_hidden_layers=2,
  first_k_dense_replace=1,
  num_attention_heads=4,
  num_key_value_heads=4,
  q_lora_rank=24,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=8,
  v_head_dim=8,
  n_routed_experts=8,
  n_shared_experts=1,
  num_experts_per_tok=2,
  n_group=2,
  topk_group=1,
  routed_scaling_factor=2.5,
  max_position_embeddings=256,
  rms_norm_eps=1e-6,  # HF hard-codes 1e-6 for q_a/kv_a_layernorm (SPEC 8.3.7)
  initializer_range=0.1,  # large enough that routing is not a near tie
  num_nextn_predict_layers=0,
  bos_token_id=0,
  eos_token_id=1,
)
_YARN = {
  "type": "yarn",
  "factor": 8.0,
  "original_max_position_embeddings": 32,
  "beta_fast": 32.0,
  "beta_slow": 1.0,
  "mscale": 1.0,
  "mscale_all_dim": 1.0,
}

# The V3 configs of the brief: (a) q_lora + 2 groups keep 1 + YaRN, (b) no q_lora,
# (c) 2 dense layers + 4 groups keep 2, (d) 2 shared experts.
V3_CONFIGS = {
  "a_qlora_yarn": dict(rope_scaling=_YARN),
  "b_no_qlora": dict(q_lora_rank=None),
  "c_dense2_groups4": dict(
    num_hidden_layers=3, first_k_dense_replace=2, n_group=4, topk_group=2, num_experts_per_tok=3
  ),
  "d_shared2": dict(n_shared_experts=2, rope_scaling=_YARN),
}
# V2-Lite-shaped: softmax, greedy top-k, one group, no renormalisation, no query compression.
V2_LITE = dict(
  q_lora_rank=None,
  n_shared_experts=2,
  num_experts_per_tok=3,
  n_group=1,
  topk_group=1,
  topk_method="greedy",
  norm_topk_prob=False,
  routed_scaling_factor=1.0,
  rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
)


def hf_model(kind: str = "a_qlora_yarn", seed: int = 0):
  """A float32 eval-mode DeepseekV3ForCausalLM (or V2 for kind 'e_v2_lite') with random
  norm weights and router bias, so that those load paths are exercised too."""
  torch.manual_seed(seed)
  if kind == "e_v2_lite":
    cfg = transformers.DeepseekV2Config(**{**_BASE, **V2_LITE})
    model = transformers.DeepseekV2ForCausalLM(cfg)
  else:
    cfg = transformers.DeepseekV3Config(**{**_BASE, **V3_CONFIGS[kind]})
    model = transformers.DeepseekV3ForCausalLM(cfg)
  randomize_(model)
  return model.float().eval()


@torch.no_grad()
def randomize_(model) -> None:
  """HF initialises RMSNorm weights to 1 and the correction bias to 0: make them random."""
  for name, p in model.named_parameters():
    if name.endswith("norm.weight"):
      p.copy_(1.0 + 0.2 * torch.randn_like(p))
  for name, b in model.named_buffers():
    if name.endswith("e_score_correction_bias"):
      b.copy_(0.1 * torch.randn_like(b))
