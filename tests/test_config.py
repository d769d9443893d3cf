"""ModelConfig: presets, validation messages, HF config round trips."""

import dataclasses

import pytest

from r1jax import PRESETS, ModelConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_through_hf(name):
  cfg = ModelConfig.from_preset(name)
  back = ModelConfig.from_hf_config(
    cfg.to_hf_config(), dtype=cfg.dtype, initializer_range=cfg.initializer_range
  )
  assert back == cfg


def test_v3_preset_matches_the_release_config():
  cfg = ModelConfig.from_preset("v3_671b")
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (7168, 61, 3)
  assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (
    256,
    8,
    8,
    4,
  )
  assert cfg.group_score == "top2sum" and cfg.use_correction_bias
  assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim) == (1536, 512, 192)


# The release config.json of DeepSeek-R1 (SPEC.md 1.2), keys as shipped.
R1_CONFIG = {
  "architectures": ["DeepseekV3ForCausalLM"],
  "model_type": "deepseek_v3",
  "attention_bias": False,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": True,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "tie_word_embeddings": False,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "v_head_dim": 128,
  "vocab_size": 129280,
}


def test_release_config_json_maps_to_the_v3_preset():
  cfg = ModelConfig.from_hf_config(R1_CONFIG, initializer_range=0.006)
  assert cfg == ModelConfig.from_preset("v3_671b")


def test_transformers_5_rope_parameters_and_v2_lite():
  hf = {
    "model_type": "deepseek_v2",
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "vocab_size": 102400,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "aux_loss_alpha": 0.001,
    "max_position_embeddings": 163840,
    "rope_parameters": {
      "rope_type": "yarn",
      "rope_theta": 10000.0,
      "factor": 40,
      "original_max_position_embeddings": 4096,
      "beta_fast": 32,
      "beta_slow": 1,
      "mscale": 0.707,
      "mscale_all_dim": 0.707,
    },
    "torch_dtype": "bfloat16",
  }
  cfg = ModelConfig.from_hf_config(hf, initializer_range=0.006)
  assert cfg == ModelConfig.from_preset("v2_lite")


@pytest.mark.parametrize(
  "overrides, field, hint",
  [
    (dict(num_experts_per_tok=9), "num_experts_per_tok", "exceeds n_routed_experts"),
    (dict(n_group=3), "n_group", "do not divide"),
    (dict(topk_group=3), "topk_group", "only n_group"),
    (dict(kv_lora_rank=0), "kv_lora_rank", "positive"),
    (dict(q_lora_rank=-1), "q_lora_rank", ">= 0"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim", "even"),
    (dict(score_func="relu"), "score_func", "sigmoid"),
    (dict(topk_method="top1"), "topk_method", "noaux_tc"),
    (dict(topk_method="greedy"), "topk_method", "n_group=1"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace", "num_hidden_layers"),
    (dict(capacity_factor=0.0), "capacity_factor", "dropless"),
    (dict(moe_impl="cuda"), "moe_impl", "xla"),
    (dict(dtype="fp8"), "dtype", "bfloat16"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group", "keep more groups"),
  ],
)
def test_bad_fields_raise_one_clear_error(overrides, field, hint):
  tiny = ModelConfig.from_preset("tiny")
  with pytest.raises(ValueError) as err:
    dataclasses.replace(tiny, **overrides)
  message = str(err.value)
  assert message.startswith(f"{field}:") and hint in message and "\n" not in message


def test_unknown_preset_names_the_choices():
  with pytest.raises(ValueError, match=r"preset: unknown preset 'v4'.*tiny"):
    ModelConfig.from_preset("v4")


def test_unknown_model_type():
  with pytest.raises(ValueError, match="model_type: 'llama'"):
    ModelConfig.from_hf_config({"model_type": "llama"})
