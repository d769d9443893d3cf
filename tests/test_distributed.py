"""r1jax.distributed: which settings start a multi-process job, and the errors for partial ones."""

import pytest

from r1jax import distributed


def test_single_process_by_default(monkeypatch):
  for var in ("R1JAX_COORDINATOR_ADDRESS", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  assert distributed.initialize() is False


def test_partial_settings_name_the_missing_ones(monkeypatch):
  monkeypatch.delenv("R1JAX_PROCESS_ID", raising=False)
  monkeypatch.delenv("R1JAX_NUM_PROCESSES", raising=False)
  monkeypatch.setenv("R1JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  with pytest.raises(ValueError, match="missing num_processes, process_id"):
    distributed.initialize()


@pytest.mark.parametrize(
  "env, multi",
  [
    ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1,t1v-2,t1v-3"}, True),  # a v5p-32 slice: 4 hosts
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
    ({"SLURM_NTASKS": "16"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({}, False),
  ],
)
def test_cluster_detection(env, multi):
  assert distributed.cluster_detected(env) is multi
