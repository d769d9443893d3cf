"""Multi-process start-up: `jax.distributed.initialize` from flags, the environment, or Cloud TPU.

Order of precedence: explicit arguments (an experiment's --coordinator_address, --num_processes,
--process_id), then the environment variables R1JAX_COORDINATOR_ADDRESS, R1JAX_NUM_PROCESSES and
R1JAX_PROCESS_ID (what `launch/worker.py` settles for every launcher; R1JAX_LOCAL_DEVICE_IDS, a
comma list, restricts the process to those local devices, e.g. one GPU each), then JAX's own cluster detection (Cloud TPU,
SLURM), which needs no arguments. On CPU the collectives between processes go over gloo.
"""

from __future__ import annotations

import os

import jax

_ENV = ("R1JAX_COORDINATOR_ADDRESS", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  auto: bool | None = None,
) -> bool:
  """Starts the multi-process runtime if asked to; returns whether it did.

  Args:
    coordinator_address: host:port of process 0's coordinator.
    num_processes: processes in the job.
    process_id: this process's index.
    auto: with no arguments and no R1JAX_* variables, let JAX detect the cluster (Cloud TPU
      pod slices, SLURM); otherwise run as a single process. None: auto exactly when the
      environment shows a multi-host job (`cluster_detected`).

  Raises:
    ValueError: some but not all of the three settings are given (names the missing ones).
  """
  env = dict(zip(("coordinator_address", "num_processes", "process_id"), _ENV, strict=True))
  given = {
    "coordinator_address": coordinator_address or os.environ.get(env["coordinator_address"]),
    "num_processes": num_processes or os.environ.get(env["num_processes"]),
    "process_id": process_id if process_id is not None else os.environ.get(env["process_id"]),
  }
  present = {k: v for k, v in given.items() if v not in (None, "")}
  if present and len(present) < 3:
    missing = sorted(set(given) - set(present))
    raise ValueError(
      f"{missing[0]}: multi-process needs coordinator_address, num_processes and process_id "
      f"together (flags or {', '.join(_ENV)}); missing {', '.join(missing)}"
    )
  if auto is None:
    auto = cluster_detected()
  if not present and not auto:
    return False
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  local = os.environ.get("R1JAX_LOCAL_DEVICE_IDS")
  local_device_ids = [int(i) for i in local.split(",")] if local else None
  if present:
    jax.distributed.initialize(
      coordinator_address=present["coordinator_address"],
      num_processes=int(present["num_processes"]),
      process_id=int(present["process_id"]),
      local_device_ids=local_device_ids,
    )
  else:
    jax.distributed.initialize()
  return True


def _cpu_only() -> bool:
  # Must not start a backend before initialize(): look at the configured platforms only.
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  return platforms.split(",")[0] == "cpu"


def cluster_detected(environ=None) -> bool:
  """Whether this process is one of several in a job JAX can join without arguments.

  Cloud TPU VMs of a multi-host slice list their workers in TPU_WORKER_HOSTNAMES; SLURM sets
  SLURM_NTASKS (and JAX reads the rest from SLURM's variables).
  """
  env = os.environ if environ is None else environ
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return True
  try:
    return int(env.get("SLURM_NTASKS", "1")) > 1
  except ValueError:
    return False
