"""The pinned flagfiles in experiments/configs/: each says how to run it, parses, and the 671B one
uses a mesh that the memory plan says fits on v5p."""

import glob
import os

import pytest

from r1jax import ModelConfig, memory_plan, sharding
from tests.cli import run_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.flags")))


def read_flagfile(path):
  """{flag: value} of `--flag=value` / `--flag` lines (comments skipped)."""
  values = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line.startswith("--"):
        name, _, value = line[2:].partition("=")
        values[name] = value if _ else "true"
  return values


def test_the_three_pinned_configs_exist_and_start_with_their_command():
  names = {os.path.basename(p) for p in CONFIGS}
  assert {"tiny_cpu.flags", "small_cpu.flags", "v3_671b_v5p.flags"} <= names
  for path in CONFIGS:
    with open(path) as f:
      first = f.readline()
    rel = os.path.relpath(path, ROOT)
    assert first.startswith("# python -m experiments.") and f"--flagfile={rel}" in first, path


def test_v3_671b_flagfile_mesh_fits_v5p_by_the_plan():
  flags = read_flagfile(os.path.join(ROOT, "experiments", "configs", "v3_671b_v5p.flags"))
  cfg = ModelConfig.from_preset(flags["preset"], dtype=flags["dtype"], remat=flags["remat"])
  mesh = sharding.parse_mesh(flags["mesh"])
  assert mesh == {"data": 1, "fsdp": 32, "expert": 8, "tensor": 1}
  plan = memory_plan.plan(
    cfg,
    mesh,
    batch=int(flags["batch_size"]),
    seq=int(flags["seq_len"]),
    rules=flags["rules"],
    remat=flags["remat"],
  )
  assert memory_plan.fit_report(plan, "v5p").startswith("fits v5p"), memory_plan.fit_report(
    plan, "v5p"
  )


@pytest.mark.parametrize("name", ["small_cpu.flags", "v3_671b_v5p.flags"])
def test_pretrain_accepts_every_flag_of_the_pinned_configs(name, tmp_path):
  """Everything validates up to the devices: small_cpu would start training (stopped by a bad
  --num_steps given after it); v3 stops at the mesh, which needs 256 devices, not this host's 8."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text('{"text": "hello"}\n')
  extra = ["--num_steps=0"] if name == "small_cpu.flags" else [f"--data_files={corpus}"]
  proc = run_module("experiments.pretrain", f"--flagfile=experiments/configs/{name}", *extra)
  assert proc.returncode == 2, proc.stderr
  want = "num_steps: must be positive" if name == "small_cpu.flags" else "--mesh: data=1,fsdp=32"
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and want in proc.stderr
