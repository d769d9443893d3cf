"""Parameter counts and cache sizes from shapes (SPEC.md 1.4 and 3.4)."""

import pytest

from r1jax import ModelConfig, active_param_count, kv_cache_bytes_per_token, param_count


def test_v3_671b_counts():
  cfg = ModelConfig.from_preset("v3_671b")
  total = param_count(cfg)
  assert total == pytest.approx(671.0e9, rel=3e-3)
  assert 37.0e9 <= active_param_count(cfg) <= 37.6e9
  mtp = param_count(cfg, include_mtp=True) - total
  assert 11.5e9 <= mtp <= 11.7e9
  # DeepSeek's README_WEIGHTS figure (36.7B) leaves the input embedding out.
  assert active_param_count(cfg, include_embedding=False) == pytest.approx(36.7e9, rel=5e-3)


def test_v2_lite_counts():
  cfg = ModelConfig.from_preset("v2_lite")
  assert param_count(cfg) == pytest.approx(15.7e9, rel=1e-2)
  # DeepSeek-V2's 2.4B activated leaves the input embedding out (with it: 2.66B).
  assert active_param_count(cfg, include_embedding=False) == pytest.approx(2.4e9, rel=5e-2)


def test_hand_count_of_the_tiny_preset():
  """Every tensor of `tiny`, counted by hand from SPEC.md's shapes."""
  c = ModelConfig.from_preset("tiny")
  m, h = c.hidden_size, c.num_attention_heads
  attn = (
    m * c.q_lora_rank
    + c.q_lora_rank
    + c.q_lora_rank * h * c.qk_head_dim
    + m * (c.kv_lora_rank + c.qk_rope_head_dim)
    + c.kv_lora_rank
    + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    + h * c.v_head_dim * m
  )
  expert = 3 * m * c.moe_intermediate_size
  moe = (c.n_routed_experts + c.n_shared_experts) * expert + m * c.n_routed_experts
  dense = 3 * m * c.intermediate_size
  layers = c.first_k_dense_replace * (attn + dense + 2 * m) + c.num_moe_layers * (
    attn + moe + 2 * m
  )
  main = layers + 2 * c.vocab_size * m + m
  assert param_count(c) == main
  mtp = attn + moe + 2 * m + 2 * m * m + 3 * m
  assert param_count(c, include_mtp=True) == main + mtp
  active = main - c.num_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * expert
  assert active_param_count(c) == active


def test_absorbed_cache_is_576_values_per_layer_for_v3():
  cfg = ModelConfig.from_preset("v3_671b")  # bfloat16 cache: 2 bytes a value
  absorbed = kv_cache_bytes_per_token(cfg, mode="absorbed")
  naive = kv_cache_bytes_per_token(cfg, mode="naive")
  assert absorbed == 576 * 2 * 61 == 70272
  assert naive == 128 * (192 + 128) * 2 * 61
  assert naive / absorbed == pytest.approx(71.1, abs=0.05)
  with pytest.raises(ValueError, match="mode: 'paged'"):
    kv_cache_bytes_per_token(cfg, mode="paged")
