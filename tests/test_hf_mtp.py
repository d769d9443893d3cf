"""The MTP layer of a release-layout checkpoint (SPEC.md 6.5) against transformers' MtpModel.

A tiny DeepseekV3 model and its transformers MtpModel get random weights; the checkpoint is written
in the release layout (the MTP depth as `model.layers.{num_hidden_layers}.*`, per-expert names,
duplicated embed/head). r1jax loads it with `hf.load`; transformers loads the same file through
`DeepseekV3ForCausalLM.from_pretrained` + `MtpModel.from_pretrained` (the path of
`generate(..., use_mtp=True)`), and both depth-1 MTP logits must agree.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_layers import MtpModel

from r1jax import hf, safetensors_io
from r1jax.model import Transformer
from tests import hf_fixtures
from tests.test_hf import _split_experts

LAYERS = hf_fixtures._BASE["num_hidden_layers"]  # the MTP depth is stored as this layer id
_DECODER = [
  "input_layernorm.weight",
  "post_attention_layernorm.weight",
  "self_attn.q_a_proj.weight",
  "self_attn.q_a_layernorm.weight",
  "self_attn.q_b_proj.weight",
  "self_attn.kv_a_proj_with_mqa.weight",
  "self_attn.kv_a_layernorm.weight",
  "self_attn.kv_b_proj.weight",
  "self_attn.o_proj.weight",
  "mlp.gate.weight",
  "mlp.gate.e_score_correction_bias",
  "mlp.shared_experts.gate_proj.weight",
  "mlp.shared_experts.up_proj.weight",
  "mlp.shared_experts.down_proj.weight",
]
# SPEC 6.5: the names under model.layers.{num_hidden_layers}. (config (a) has q_lora, 8 experts)
RELEASE_MTP_NAMES = sorted(
  [
    "embed_tokens.weight",
    "enorm.weight",
    "hnorm.weight",
    "eh_proj.weight",
    "shared_head.norm.weight",
    "shared_head.head.weight",
  ]
  + _DECODER
  + [f"mlp.experts.{e}.{w}_proj.weight" for e in range(8) for w in ("gate", "up", "down")]
)


class _MainModel(transformers.DeepseekV3ForCausalLM):
  # transformers hard-codes the MTP layer id 61 (SPEC 6.6); MtpModel.from_pretrained finds the MTP
  # tensors through this pattern, so the toy model names its own layer id.
  _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{LAYERS}.*"]


def _release_tensors(main, mtp):
  """Main model + MTP module -> release-layout tensors (numpy), as the released checkpoints."""
  tensors = {k: v.numpy() for k, v in main.state_dict().items() if "rotary" not in k}
  p = f"model.layers.{LAYERS}."
  for name, w in mtp.state_dict().items():
    name = name.removeprefix("layers.0.")
    if name in ("embed_tokens.weight", "shared_head.weight") or "rotary" in name:
      continue  # tied to the main model; the release copies are written below
    name = name.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
    tensors[p + name] = w.numpy()
  tensors[p + "embed_tokens.weight"] = main.model.embed_tokens.weight.detach().numpy()
  tensors[p + "shared_head.head.weight"] = main.lm_head.weight.detach().numpy()
  return _split_experts(tensors)


@pytest.fixture(scope="module")
def release_mtp(tmp_path_factory):
  """(path of the release-layout checkpoint, its tensors, the reference MTP state dict)."""
  config = transformers.DeepseekV3Config(
    **{**hf_fixtures._BASE, **hf_fixtures.V3_CONFIGS["a_qlora_yarn"], "num_nextn_predict_layers": 1}
  )
  torch.manual_seed(0)
  main = transformers.DeepseekV3ForCausalLM(config)
  mtp = MtpModel(main, 1)  # the MTP layer always has an MoE FFN (first_k_dense_replace -> 0)
  with torch.no_grad():  # MtpModel leaves the experts and router uninitialised (torch.empty)
    for name, w in mtp.named_parameters():
      if name.startswith("layers.") and w.ndim >= 2:  # not the embed/head shared with main
        w.normal_(0.0, config.initializer_range)
  hf_fixtures.randomize_(main)
  hf_fixtures.randomize_(mtp)
  main, mtp = main.float().eval(), mtp.float().eval()
  path = tmp_path_factory.mktemp("release_mtp")
  tensors = _release_tensors(main, mtp)
  safetensors_io.write_safetensors(str(path / safetensors_io.SINGLE_FILE), tensors)
  config.save_pretrained(str(path))
  return str(path), tensors, {k: v.clone() for k, v in mtp.state_dict().items()}


def test_release_mtp_tensor_names(release_mtp):
  _, tensors, _ = release_mtp
  p = f"model.layers.{LAYERS}."
  assert sorted(k[len(p) :] for k in tensors if k.startswith(p)) == RELEASE_MTP_NAMES
  assert not any(re.match(rf"model\.layers\.{LAYERS + 1}\.", k) for k in tensors)
  assert tensors[p + "eh_proj.weight"].shape == (32, 64)  # [D, 2D]


def test_mtp_logits_match_transformers(release_mtp):
  path, _, reference = release_mtp
  # transformers reads the same file as generate(..., use_mtp=True) does
  main, info = _MainModel.from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"]
  main = main.float().eval()
  mtp = MtpModel.from_pretrained(main).float().eval()
  for name, w in mtp.state_dict().items():  # the file holds the weights the model was built with
    torch.testing.assert_close(w, reference[name], rtol=0, atol=0, msg=name)

  cfg, variables = hf.load(path, dtype="float32")
  assert cfg.num_nextn_predict_layers == 1
  assert "mtp_0" in variables["params"]
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)).astype(np.int32)
  apply = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, mtp=True))
  logits, mtp_logits = apply(variables, jnp.asarray(tokens))
  assert mtp_logits.shape == (1, 2, 12, cfg.vocab_size)

  ids = torch.tensor(tokens, dtype=torch.long)
  s = tokens.shape[1]
  with torch.no_grad():
    out = main(ids, output_hidden_states=True)
    # hidden_states[-1] is the final-normed state (SPEC 6.3); position i pairs with token i + 1,
    # and the MTP layer gets the positions of those tokens, as MTPCandidateGenerator slices them.
    # RoPE depends only on relative positions, so r1jax's unshifted positions give the same result.
    positions = torch.arange(1, s)[None].expand(tokens.shape[0], -1)
    h = mtp.forward_layer(0, out.hidden_states[-1][:, :-1], positions, None, input_ids=ids[:, 1:])
    expected = mtp._project_to_logits(h).numpy()

  np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), rtol=0, atol=1e-4)
  got = np.asarray(mtp_logits[0, :, : s - 1])  # the last position has no token i + 1
  rel = float(np.abs(got - expected).max() / np.abs(expected).max())
  assert rel < 1e-5, rel
