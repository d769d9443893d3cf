"""experiments.plan / r1jax.memory_plan: sizes that can be checked by hand, and its refusals."""

import os
import subprocess
import sys

import pytest

from r1jax import memory_plan
from r1jax.config import ModelConfig
from r1jax.sizing import param_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V5P_256 = dict(data=1, fsdp=32, expert=8, tensor=1)


def _plan(args):
  return subprocess.run(
    [sys.executable, "-m", "experiments.plan", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def test_v3_671b_on_256_v5p_chips_is_params_times_bytes_over_shards():
  cfg = ModelConfig.from_preset("v3_671b")
  p = memory_plan.plan(cfg, V5P_256, batch=256, seq=4096)
  n_params = param_count(cfg, include_mtp=True)
  bias = (cfg.num_moe_layers + cfg.num_nextn_predict_layers) * cfg.n_routed_experts
  assert sum(g.count for g in p.param_groups) == n_params + bias
  # ep_fsdp: every weight is split over all 256 chips; only the router bias is replicated
  assert {g.shards: g.count for g in p.param_groups} == {256: n_params, 1: bias}
  assert p.params == pytest.approx(n_params * 4 / 256 + bias * 4)
  assert p.optimizer == 2 * p.params and p.gradients == p.params
  assert p.local_batch == 1
  # token exchange: 59 MoE layers (58 + MTP) x dispatch+combine x fwd+2 bwd x 4096 x 8 x 7168 x 2 B
  assert p.all_to_all == pytest.approx(59 * 2 * 3 * 4096 * 8 * 7168 * 2 * 7 / 8)
  assert memory_plan.fit_report(p, "v5p").startswith("fits v5p (95 GB)")


def test_plan_cli_prints_the_table():
  proc = _plan(["--preset=v3_671b", "--mesh=data=1,fsdp=32,expert=8,tensor=1", "--accelerator=v5p"])
  assert proc.returncode == 0, proc.stderr
  assert "671.03B params + 11.61B MTP" in proc.stdout
  assert "split 256 ways" in proc.stdout and "fits v5p" in proc.stdout


def test_plan_refuses_an_expert_axis_that_does_not_divide_256():
  proc = _plan(["--preset=v3_671b", "--mesh=data=1,fsdp=-1,expert=3", "--chips=255"])
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
    "error: --mesh: expert=3 does not divide n_routed_experts=256; choose an expert axis that "
    "divides it"
  )


def test_a_plan_that_does_not_fit_names_the_term_and_the_excess():
  cfg = ModelConfig.from_preset("v3_671b")
  p = memory_plan.plan(cfg, dict(fsdp=8, expert=8), batch=64, seq=4096)
  report = memory_plan.fit_report(p, "v6e")
  assert report.startswith("does not fit v6e (32 GB)")
  over = (p.total - 32e9) / 1e9
  assert f"{over:.1f} GB over; the largest term is optimizer state" in report


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(batch=100), "--batch: 100 sequences do not split over the 256 batch shards"),
    (dict(rules="tp"), "--rules: unknown 'tp'"),
    (dict(remat="some"), "--remat: unknown 'some'"),
  ],
)
def test_bad_plan_inputs_are_named(kwargs, message):
  cfg = ModelConfig.from_preset("v3_671b")
  with pytest.raises(ValueError, match=message):
    memory_plan.plan(cfg, V5P_256, **{"batch": 256, "seq": 4096, **kwargs})
