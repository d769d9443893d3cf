"""ModelConfig: the DeepSeek-V3 / R1 (and V2) architecture as one frozen, validated dataclass.

Field names follow the Hugging Face `config.json` of the released checkpoints (SPEC.md section 1),
so `ModelConfig.from_hf_config(json.load(...))` and `to_hf_config()` are near-identity maps. What
the HF config leaves implicit is explicit here: `score_func`, `topk_method` (which fixes the group
score: top-2 sum for `noaux_tc`, max for `group_limited_greedy`), whether the correction bias
exists, the YaRN fields, and the dtype policy.

Every construction (including `dataclasses.replace`) is validated: a bad field raises one
`ValueError` that names the field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SCORE_FUNCS = ("sigmoid", "softmax")
# topk_method -> group score used for group-limited routing (None: no grouping).
TOPK_METHODS = {"noaux_tc": "top2sum", "group_limited_greedy": "max", "greedy": None}
ROPE_TYPES = ("default", "yarn")
DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("auto", "xla", "reference", "pallas")
EXPERT_EXCHANGES = ("auto", "all_gather", "ragged_all_to_all")
# What MLA's decode cache holds (r1jax.layers.mla): "absorbed" the normalised latent and the
# shared RoPE key, "naive" per-head keys and values (DeepSeek's attn_impl="naive").
DECODE_CACHES = ("absorbed", "naive")
# What a decoder layer's backward keeps: "none" everything, "full" only the layer's input (the
# forward runs again), "dots" the matmul outputs without batch dims (elementwise work reruns).
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3-family architecture. Defaults are the DeepSeek-V3/R1 671B values."""

  # --- Vocabulary and trunk. Layers [0, first_k_dense_replace) use a dense SwiGLU FFN of
  # `intermediate_size`; the rest are MoE layers.
  vocab_size: int = 129280
  hidden_size: int = 7168
  num_hidden_layers: int = 61
  intermediate_size: int = 18432
  first_k_dense_replace: int = 3
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  bos_token_id: int = 0
  eos_token_id: int = 1

  # --- Multi-head Latent Attention. q_lora_rank == 0 means no query compression (V2-Lite).
  num_attention_heads: int = 128
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  decode_cache: str = "absorbed"  # one of DECODE_CACHES; the same model either way
  # Decode-size work (a few rows: decode steps) on XLA:CPU runs r1jax's C++ kernels
  # (r1jax/cpu_kernels) where they apply; False: XLA's ops only. The same results either way
  # (float32 rounding aside).
  cpu_kernels: bool = True

  # --- DeepSeekMoE. Routed experts are selected per token by the gate; shared experts see every
  # token (one fused SwiGLU of n_shared_experts * moe_intermediate_size).
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  moe_intermediate_size: int = 2048
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  score_func: str = "sigmoid"
  topk_method: str = "noaux_tc"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  # Sequence-wise balance loss weight alpha (V3: 1e-4) and the dispatch implementation.
  aux_loss_alpha: float = 1e-4
  capacity_factor: float | None = None  # None: dropless, as DeepSeek trains and serves.
  moe_impl: str = "auto"
  # How expert shards exchange tokens on a mesh (r1jax.expert_parallel).
  expert_exchange: str = "auto"

  # --- RoPE on the decoupled qk_rope_head_dim dims, with optional YaRN (SPEC.md section 4).
  max_position_embeddings: int = 163840
  rope_theta: float = 10000.0
  rope_type: str = "yarn"
  rope_factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  rope_interleave: bool = True

  # --- Multi-token prediction depth (the MTP modules share embedding and head).
  num_nextn_predict_layers: int = 1

  # --- Dtype policy and init. Params are stored in param_dtype; matmuls run in dtype;
  # norms, softmax, router and logits always run in float32.
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  initializer_range: float = 0.006
  scan_layers: bool = True
  remat: str = "none"  # one of REMAT_POLICIES

  # --- Optional variants (off in every DeepSeek preset; they need scan_layers=False, the layers
  # differing). attention_windows: one entry per layer, 0 global attention, W > 0 local attention
  # over the W most recent tokens, whose decode cache is a ring of W slots (r1jax/layers/mla.py);
  # empty: all global. Token merging (r1jax/layers/token_merge.py), on when merge_ratio > 0:
  # floor(merge_ratio * s) tokens give up their slot at the input of layer merge_layer and the
  # stream is inflated back to s positions at the input of layer inflate_layer; a token whose
  # cosine similarity to its predecessor reaches merge_threshold is merged first.
  attention_windows: tuple[int, ...] = ()
  merge_ratio: float = 0.0
  merge_layer: int = 1
  inflate_layer: int = 2
  merge_threshold: float = 0.9

  def __post_init__(self):
    if not isinstance(self.attention_windows, tuple):  # a list from config.json
      object.__setattr__(self, "attention_windows", tuple(self.attention_windows))
    _validate(self)

  # ----------------------------------------------------------------------------- derived
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def num_moe_layers(self) -> int:
    return self.num_hidden_layers - self.first_k_dense_replace

  @property
  def merges_tokens(self) -> bool:
    return self.merge_ratio > 0

  @property
  def has_variants(self) -> bool:
    """Whether local attention or token merging is on (neither is in DeepSeek's models)."""
    return any(self.attention_windows) or self.merges_tokens

  def window(self, layer: int) -> int:
    """Layer `layer`'s attention window (0: global)."""
    return self.attention_windows[layer] if self.attention_windows else 0

  @property
  def group_score(self) -> str | None:
    """'top2sum' (V3), 'max' (V2-236B) or None (no group limiting)."""
    return TOPK_METHODS[self.topk_method] if self.n_group > 1 else None

  @property
  def use_correction_bias(self) -> bool:
    """The aux-loss-free balancing bias exists only with `noaux_tc` (V3/R1)."""
    return self.topk_method == "noaux_tc"

  # ----------------------------------------------------------------------------- presets
  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
    """One of `PRESETS` ('tiny', 'small', 'v2_lite', 'v3_671b'), with optional field overrides."""
    if name not in PRESETS:
      raise ValueError(f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  # ----------------------------------------------------------------------------- HF config
  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Maps a DeepSeek V2/V3 `config.json` dict (legacy `rope_scaling` or 5.x `rope_parameters`)."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
      raise ValueError(
        f"model_type: {model_type!r} is not supported; expected 'deepseek_v3' or 'deepseek_v2'"
      )
    v2 = model_type == "deepseek_v2"
    kw: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
      if field.name in hf and field.name not in _NOT_FROM_HF:
        kw[field.name] = hf[field.name]
    kw["q_lora_rank"] = hf.get("q_lora_rank") or 0
    kw["num_nextn_predict_layers"] = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0))
    # HF's V3 router is always sigmoid + bias + top-2-sum groups whatever the keys say (SPEC 5.3);
    # the V2 router is always softmax without bias.
    kw["score_func"] = "softmax" if v2 else hf.get("scoring_func", "sigmoid")
    kw["topk_method"] = hf.get("topk_method", "greedy" if v2 else "noaux_tc")
    if v2 and kw["topk_method"] == "noaux_tc":
      raise ValueError("topk_method: 'noaux_tc' needs model_type 'deepseek_v3'")
    kw["norm_topk_prob"] = hf.get("norm_topk_prob", not v2)
    kw["routed_scaling_factor"] = float(hf.get("routed_scaling_factor", 1.0))
    kw["aux_loss_alpha"] = float(hf.get("aux_loss_alpha", 1e-4 if not v2 else 1e-3))
    kw["n_group"] = hf.get("n_group") or 1
    kw["topk_group"] = hf.get("topk_group") or 1
    kw.update(_rope_from_hf(hf))
    if "torch_dtype" in hf or "dtype" in hf:
      kw["dtype"] = _DTYPE_NAMES.get(str(hf.get("dtype", hf.get("torch_dtype"))), "bfloat16")
    kw["initializer_range"] = hf.get("initializer_range", 0.02)
    kw.update(overrides)
    return cls(**kw)

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict that transformers' DeepseekV3/V2 config classes accept."""
    if self.has_variants:
      raise ValueError(
        "attention_windows / merge_ratio: transformers' DeepSeek models have neither local "
        "attention nor token merging; only a model without them has an HF config"
      )
    v2 = self.score_func == "softmax"
    hf: dict[str, Any] = {
      f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_TO_HF
    }
    hf.update(
      architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
      model_type="deepseek_v2" if v2 else "deepseek_v3",
      q_lora_rank=self.q_lora_rank or None,
      scoring_func=self.score_func,
      num_key_value_heads=self.num_attention_heads,
      hidden_act="silu",
      attention_bias=False,
      attention_dropout=0.0,
      moe_layer_freq=1,
      ep_size=1,
      torch_dtype=self.dtype,
      rope_scaling=self._hf_rope_scaling(),
    )
    if v2:
      hf["aux_loss_alpha"] = self.aux_loss_alpha
      hf["seq_aux"] = True
    return hf

  def _hf_rope_scaling(self) -> dict[str, Any] | None:
    if self.rope_type != "yarn":
      return None
    return {
      "type": "yarn",
      "factor": self.rope_factor,
      "original_max_position_embeddings": self.original_max_position_embeddings,
      "beta_fast": self.beta_fast,
      "beta_slow": self.beta_slow,
      "mscale": self.mscale,
      "mscale_all_dim": self.mscale_all_dim,
    }


_NOT_FROM_HF = frozenset(
  {
    "attention_windows",
    "merge_ratio",
    "merge_layer",
    "inflate_layer",
    "merge_threshold",
    "q_lora_rank",
    "dtype",
    "param_dtype",
    "moe_impl",
    "expert_exchange",
    "decode_cache",
    "cpu_kernels",
    "capacity_factor",
    "scan_layers",
    "remat",
    "score_func",
  }
)
_NOT_TO_HF = frozenset(
  {
    "attention_windows",
    "merge_ratio",
    "merge_layer",
    "inflate_layer",
    "merge_threshold",
    "score_func",
    "dtype",
    "param_dtype",
    "moe_impl",
    "expert_exchange",
    "decode_cache",
    "cpu_kernels",
    "capacity_factor",
    "scan_layers",
    "remat",
    "rope_type",
    "rope_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
  }
)
_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """Legacy `rope_scaling` + `rope_theta`, or transformers 5.x `rope_parameters`."""
  params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = params.get("rope_type", params.get("type", "default"))
  out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 1e4)))}
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling.type: {kind!r} is not supported; use one of {ROPE_TYPES}")
  out["rope_type"] = kind
  if kind == "yarn":
    out.update(
      rope_factor=float(params["factor"]),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)),
      beta_fast=float(params.get("beta_fast", 32.0)),
      beta_slow=float(params.get("beta_slow", 1.0)),
      mscale=float(params.get("mscale", 1.0)),
      mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
    )
  return out


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ValueError(f"{field}: {message}")


def _validate(c: ModelConfig) -> None:
  """One clear error per bad field; checked in dependency order."""
  for name in (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "max_position_embeddings",
  ):
    value = getattr(c, name)
    _check(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
  _check(
    c.q_lora_rank >= 0,
    "q_lora_rank",
    f"must be >= 0 (0: no query compression), got {c.q_lora_rank}",
  )
  _check(c.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {c.n_shared_experts}")
  _check(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
  _check(
    c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
    "qk_rope_head_dim",
    f"must be a positive even integer (RoPE rotates pairs), got {c.qk_rope_head_dim}",
  )
  _check(
    0 <= c.first_k_dense_replace <= c.num_hidden_layers,
    "first_k_dense_replace",
    f"must be in [0, num_hidden_layers={c.num_hidden_layers}], got {c.first_k_dense_replace}",
  )
  if c.first_k_dense_replace > 0:
    _check(c.intermediate_size > 0, "intermediate_size", "must be positive when dense layers exist")
  _check(
    c.num_experts_per_tok <= c.n_routed_experts,
    "num_experts_per_tok",
    f"top-k {c.num_experts_per_tok} exceeds n_routed_experts={c.n_routed_experts}; lower it",
  )
  _check(c.score_func in SCORE_FUNCS, "score_func", f"{c.score_func!r}; use one of {SCORE_FUNCS}")
  _check(
    c.topk_method in TOPK_METHODS,
    "topk_method",
    f"{c.topk_method!r}; use one of {sorted(TOPK_METHODS)}",
  )
  _check(
    c.n_routed_experts % c.n_group == 0,
    "n_group",
    f"{c.n_group} groups do not divide n_routed_experts={c.n_routed_experts}; pick a divisor",
  )
  _check(
    c.topk_group <= c.n_group,
    "topk_group",
    f"keeps {c.topk_group} groups but there are only n_group={c.n_group}; lower it",
  )
  _validate_groups(c)
  _validate_variants(c)
  _check(c.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
  _check(c.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")
  _check(
    c.capacity_factor is None or c.capacity_factor > 0,
    "capacity_factor",
    f"must be positive or None (dropless), got {c.capacity_factor}",
  )
  _check(
    c.expert_exchange in EXPERT_EXCHANGES,
    "expert_exchange",
    f"{c.expert_exchange!r}; use one of {EXPERT_EXCHANGES}",
  )
  _check(c.moe_impl in MOE_IMPLS, "moe_impl", f"{c.moe_impl!r}; use one of {MOE_IMPLS}")
  _check(
    c.decode_cache in DECODE_CACHES,
    "decode_cache",
    f"{c.decode_cache!r}; use one of {DECODE_CACHES}",
  )
  _check(c.remat in REMAT_POLICIES, "remat", f"{c.remat!r}; use one of {REMAT_POLICIES}")
  _check(c.rope_type in ROPE_TYPES, "rope_type", f"{c.rope_type!r}; use one of {ROPE_TYPES}")
  if c.rope_type == "yarn":
    _check(c.rope_factor >= 1.0, "rope_factor", f"YaRN factor must be >= 1, got {c.rope_factor}")
    _check(
      c.original_max_position_embeddings > 0, "original_max_position_embeddings", "must be > 0"
    )
  _check(c.rope_theta > 0, "rope_theta", "must be positive")
  _check(c.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
  _check(c.dtype in DTYPES, "dtype", f"{c.dtype!r}; use one of {DTYPES}")
  _check(c.param_dtype in DTYPES, "param_dtype", f"{c.param_dtype!r}; use one of {DTYPES}")
  _check(c.initializer_range > 0, "initializer_range", "must be positive")


def variant_overrides(
  windows: list[str], merge_ratio: float, merge_layer: int, inflate_layer: int, threshold: float
) -> dict[str, Any]:
  """The trainer's --attention_windows and --merge_* values as ModelConfig fields; either one
  turns the layer scan off (the layers differ). Raises a ValueError naming the flag."""
  out: dict[str, Any] = {}
  if windows:
    try:
      out["attention_windows"] = tuple(int(w) for w in windows)
    except ValueError:
      raise ValueError(
        f"--attention_windows: {','.join(windows)!r} is not a list of integers, one per layer "
        "(0: global)"
      ) from None
  if merge_ratio:
    out.update(
      merge_ratio=merge_ratio,
      merge_layer=merge_layer,
      inflate_layer=inflate_layer,
      merge_threshold=threshold,
    )
  if out:
    out["scan_layers"] = False
  return out


def _validate_variants(c: ModelConfig) -> None:
  """attention_windows and the token-merging fields."""
  w = c.attention_windows
  _check(
    not w or len(w) == c.num_hidden_layers,
    "attention_windows",
    f"has {len(w)} entries for num_hidden_layers={c.num_hidden_layers}; give one per layer "
    "(0: global)",
  )
  _check(
    all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in w),
    "attention_windows",
    f"entries must be integers >= 0 (0: global, W: the W most recent tokens), got {w}",
  )
  _check(
    0 <= c.merge_ratio <= 0.5,
    "merge_ratio",
    f"must be in [0, 0.5] (the fraction of tokens merged away; 0: off), got {c.merge_ratio}",
  )
  _check(-1 <= c.merge_threshold <= 1, "merge_threshold", "is a cosine similarity, in [-1, 1]")
  if c.merges_tokens:
    _check(
      0 <= c.merge_layer < c.inflate_layer <= c.num_hidden_layers,
      "merge_layer",
      f"merge_layer={c.merge_layer} and inflate_layer={c.inflate_layer} need 0 <= merge_layer "
      f"< inflate_layer <= num_hidden_layers={c.num_hidden_layers}",
    )
  if c.has_variants:
    _check(
      not c.scan_layers,
      "scan_layers",
      "local attention and token merging make layers differ; set scan_layers=False",
    )


def _validate_groups(c: ModelConfig) -> None:
  if c.n_group == 1:
    return
  _check(
    c.topk_method != "greedy",
    "topk_method",
    f"'greedy' ignores groups but n_group={c.n_group}; set n_group=1 or use "
    "'noaux_tc' / 'group_limited_greedy'",
  )
  per_group = c.n_routed_experts // c.n_group
  if c.group_score == "top2sum":
    _check(per_group >= 2, "n_group", "top-2-sum group scores need >= 2 experts per group")
  _check(
    c.topk_group * per_group >= c.num_experts_per_tok,
    "topk_group",
    f"{c.topk_group} kept groups x {per_group} experts < top-k {c.num_experts_per_tok}; "
    "keep more groups",
  )


def yarn_mscale(scale: float, m: float) -> float:
  """YaRN attention-temperature factor 0.1 * m * ln(scale) + 1 (1 when scale <= 1)."""
  return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0


PRESETS: dict[str, ModelConfig] = {
  # DeepSeek-V3 / R1 exactly (SPEC.md 1.2).
  "v3_671b": ModelConfig(),
  # DeepSeek-V2-Lite 16B (SPEC.md 1.3): softmax, greedy top-6, no query low-rank, no renorm.
  "v2_lite": ModelConfig(
    vocab_size=102400,
    hidden_size=2048,
    num_hidden_layers=27,
    intermediate_size=10944,
    first_k_dense_replace=1,
    bos_token_id=100000,
    eos_token_id=100001,
    num_attention_heads=16,
    q_lora_rank=0,
    n_routed_experts=64,
    n_shared_experts=2,
    moe_intermediate_size=1408,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    score_func="softmax",
    topk_method="greedy",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    aux_loss_alpha=1e-3,
    mscale=0.707,
    mscale_all_dim=0.707,
    num_nextn_predict_layers=0,
  ),
  # The CPU benchmark model (~90M params): V3 semantics at a size a 2-core CPU trains.
  "small": ModelConfig(
    vocab_size=8192,
    hidden_size=512,
    num_hidden_layers=4,
    intermediate_size=1408,
    first_k_dense_replace=1,
    num_attention_heads=8,
    q_lora_rank=192,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=64,
    n_shared_experts=1,
    moe_intermediate_size=256,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    max_position_embeddings=4096,
    rope_factor=4.0,
    original_max_position_embeddings=1024,
    dtype="float32",
  ),
  # CPU unit tests (~0.3M params): every feature on (groups, bias, YaRN, MTP, dense + MoE).
  "tiny": ModelConfig(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=128,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_intermediate_size=32,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    max_position_embeddings=512,
    rope_factor=4.0,
    original_max_position_embeddings=128,
    dtype="float32",
    initializer_range=0.02,
  ),
}
