"""launch/tpu.sh and launch/gpu_slurm.sh against fake gcloud / sbatch / srun that record their
calls; launch/worker.py's SLURM settings; a SLURM job's processes train like one process."""

import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

from launch import tpu, worker
from tests import fake_cluster_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILE = os.path.join(ROOT, "experiments", "configs", "tiny_cpu.flags")
TPU_FLAGS = [
  "--name=r1-test",
  "--zone=us-east5-a",
  "--project=proj",
  "--accelerator=v5p-16",
  "--job=pretrain",
  f"--flagfile={FLAGFILE}",
  "--workdir=gs://bucket/runs/r1",
  "--spot",
  "--delete-after",
  "--poll_seconds=0.01",
]


@pytest.fixture
def fakes(tmp_path):
  """(run, log): run(script, args, **env) runs launch/<script> with the fakes first on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake_cluster_tools.install(str(bin_dir))
  log = str(tmp_path / "calls.jsonl")

  def run(script, args, path=None, timeout=120, **env):
    environ = {**os.environ, "FAKE_LOG": log, "R1JAX_PYTHON": sys.executable, **env}
    environ["PATH"] = path if path is not None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
      ["bash", os.path.join(ROOT, "launch", script), *args],
      capture_output=True,
      text=True,
      timeout=timeout,
      env=environ,
      cwd=str(tmp_path),
    )

  return run, log


def _path_without_cloud_tools(tmp_path):
  """A PATH with only what the wrappers need (this machine has a real gcloud in /usr/bin)."""
  tools = tmp_path / "tools"
  tools.mkdir()
  for tool in ("bash", "env", "dirname"):
    os.symlink(subprocess.check_output(["which", tool], text=True).strip(), tools / tool)
  return str(tools)


def _calls(log, tool):
  return [c[1:] for c in fake_cluster_tools.recorded(log) if isinstance(c, list) and c[0] == tool]


def _one_error_line(proc, start):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), proc.stderr


def test_tpu_launch_creates_installs_on_all_workers_runs_the_flagfile_and_deletes(fakes):
  run, log = fakes
  proc = run("tpu.sh", TPU_FLAGS + ["--", "--num_steps=5"], FAKE_TPU_STATES="WAITING,ACTIVE")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = _calls(log, "gcloud")
  scope = ["--zone=us-east5-a", "--project=proj"]
  probe = "gs://bucket/runs/r1/.r1jax_write_check"
  assert calls[0][:2] == ["storage", "cp"] and calls[0][3] == probe
  assert calls[1] == ["storage", "rm", probe, "--project=proj"]
  assert calls[2] == [
    *"compute tpus queued-resources create r1-test --node-id=r1-test".split(),
    *scope,
    "--accelerator-type=v5p-16",
    "--runtime-version=v2-alpha-tpuv5",
    "--spot",
  ]
  describe = [*"compute tpus queued-resources describe r1-test".split(), *scope]
  assert calls[3] == calls[4] == [*describe, "--format=value(state.state)"]  # WAITING, ACTIVE
  scp, install, job, delete = calls[5:]
  assert scp[:4] == "compute tpus tpu-vm scp".split() and scp[5:] == [
    "r1-test:r1jax.tar.gz",
    *scope,
    "--worker=all",
  ]
  ssh = [*"compute tpus tpu-vm ssh r1-test".split(), *scope, "--worker=all"]
  assert install[:-1] == ssh and job[:-1] == ssh
  assert "pip install --python=$HOME/r1jax-venv/bin/python -e '.[tpu]'" in install[-1]
  assert "tar -xzf $HOME/r1jax.tar.gz -C $HOME/r1jax" in install[-1]
  command = job[-1].removeprefix("--command=")
  assert command.startswith("cd $HOME/r1jax && $HOME/r1jax-venv/bin/python ")
  assert shlex.split(command.split(" && ", 1)[1])[1:] == [
    *"-m launch.worker --job=pretrain -- --flagfile=launch.flags".split(),
    "--workdir=gs://bucket/runs/r1",
    "--num_steps=5",
  ]
  assert delete == [*"compute tpus queued-resources delete r1-test".split(), *scope, "--force"] + [
    "--quiet"
  ]
  # The tarball carries this checkout (the worker among it) and the flagfile as launch.flags.
  (tarball,) = [c for c in fake_cluster_tools.recorded(log) if isinstance(c, dict)]
  assert {"launch/worker.py", "r1jax/model.py", "setup.cfg"} <= set(tarball["tarball"])
  assert not any(name.startswith(".venv/") for name in tarball["tarball"])
  assert tarball["launch.flags"] == open(FLAGFILE).read()


def test_tpu_dry_run_prints_the_commands_of_a_live_run_and_runs_none(fakes):
  run, log = fakes
  live = run("tpu.sh", TPU_FLAGS)
  assert live.returncode == 0, live.stderr
  recorded = _calls(log, "gcloud")
  os.remove(log)
  dry = run("tpu.sh", [*TPU_FLAGS, "--dry-run"])
  assert dry.returncode == 0, dry.stderr
  assert not os.path.exists(log)  # no gcloud call at all
  printed = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]
  assert all(p[0] == "gcloud" for p in printed)
  # The same sequence (temporary file names aside); the state poll printed once.
  temp = lambda call: [re.sub(r"^/tmp/\S+", "TMP", a) for a in call]
  assert [temp(p[1:]) for p in printed] == [temp(c) for c in recorded]
  assert "# repeated every 0.01 s until the state is ACTIVE:" in dry.stdout


def test_tpu_failed_run_or_failed_slice_still_deletes(fakes):
  run, log = fakes
  proc = run("tpu.sh", TPU_FLAGS, FAKE_RUN_EXIT="3")
  assert proc.returncode == 1 and "exited with code 3" in proc.stderr
  assert _calls(log, "gcloud")[-1][:4] == "compute tpus queued-resources delete".split()
  os.remove(log)
  os.remove(log + ".describes")  # the fake's poll counter: start the states over
  proc = run("tpu.sh", TPU_FLAGS, FAKE_TPU_STATES="PROVISIONING,FAILED")
  assert proc.returncode == 1 and "r1-test is FAILED" in proc.stderr
  verbs = [c[3] for c in _calls(log, "gcloud") if c[:2] == ["compute", "tpus"]]
  assert verbs == ["create", "describe", "describe", "delete"]


def _replace(flags, **new):
  out = [f for f in flags if f.split("=")[0].lstrip("-") not in new]
  return out + [f"--{k}={v}" for k, v in new.items()]


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(accelerator="v7-8"), "--accelerator: unknown type 'v7-8'; known: v2-N"),
    (dict(accelerator="v5p-15"), "--accelerator: v5p-15 is not a v5p slice size"),
    (dict(accelerator="v6e-12"), "--accelerator: v6e-12 is not a v6e slice size"),
    (dict(name="R1_test"), "--name: 'R1_test' must be lowercase"),
    (dict(job="nope"), "--job: unknown 'nope'"),
    (dict(job="grpo"), "--job: grpo runs in one process; a v5p-16 slice has 2 workers"),
    (dict(workdir="runs/r1"), "--workdir: a v5p-16 slice has 2 workers"),
    (dict(flagfile="/no/such.flags"), "--flagfile: /no/such.flags does not exist"),
  ],
)
def test_tpu_bad_input_exits_2_with_one_line_before_anything_is_created(fakes, change, message):
  run, log = fakes
  _one_error_line(run("tpu.sh", _replace(TPU_FLAGS, **change)), message)
  assert _calls(log, "gcloud") == []


def test_tpu_unwritable_workdir_or_missing_gcloud_stops_before_create(fakes, tmp_path):
  run, log = fakes
  proc = run("tpu.sh", TPU_FLAGS, FAKE_GCS_DENY="1")
  _one_error_line(proc, "--workdir: gs://bucket/runs/r1 is not writable")
  assert "403" in proc.stderr
  assert [c[:2] for c in _calls(log, "gcloud")] == [["storage", "cp"]]  # no create
  proc = run("tpu.sh", TPU_FLAGS, path=_path_without_cloud_tools(tmp_path))
  _one_error_line(proc, "gcloud: not found on PATH; install the Google Cloud CLI")


@pytest.mark.parametrize(
  "accelerator, chips, hosts",
  [
    ("v5p-8", 4, 1),
    ("v5p-16", 8, 2),
    ("v5p-512", 256, 64),
    ("v4-32", 16, 4),
    ("v3-8", 4, 1),
    ("v2-32", 16, 4),
    ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4),
    ("v6e-1", 1, 1),
    ("v6e-256", 256, 64),
  ],
)
def test_accelerator_types_give_chips_and_hosts(accelerator, chips, hosts):
  tpu_slice = tpu.parse_accelerator(accelerator)
  assert (tpu_slice.chips, tpu_slice.hosts) == (chips, hosts)


SLURM_FLAGS = ["--nodes=2", "--gpus_per_node=8", "--job=pretrain", f"--flagfile={FLAGFILE}"]


def test_slurm_submits_a_script_that_installs_once_and_runs_every_process(fakes, tmp_path):
  run, log = fakes
  flags = [*SLURM_FLAGS, f"--workdir={tmp_path}/run", f"--log_dir={tmp_path}/logs"]
  proc = run("gpu_slurm.sh", [*flags, "--partition=gpu", "--time=2:00:00", "--", "--seed=3"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (sbatch,) = _calls(log, "sbatch")
  assert sbatch[0] == "--parsable" and sbatch[1].startswith(f"{tmp_path}/logs/r1jax-pretrain-")
  assert f"submitted job 4242; its log: {tmp_path}/logs/r1jax-pretrain-4242.out" in proc.stdout
  (script,) = [c["script"] for c in fake_cluster_tools.recorded(log) if isinstance(c, dict)]
  header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
  assert header == {
    "job-name": "r1jax-pretrain",
    "nodes": "2",
    "ntasks-per-node": "8",
    "gpus-per-node": "8",
    "output": f"{tmp_path}/logs/%x-%j.out",
    "partition": "gpu",
    "time": "2:00:00",
  }
  python = os.path.join(ROOT, ".venv", "bin", "python")
  assert f"{python} -m pip install --quiet -e '.[cuda]'" in script.splitlines()
  srun = shlex.split(script.strip().splitlines()[-1])
  assert srun == [
    *f"srun --kill-on-bad-exit=1 {python} -m launch.worker --job=pretrain".split(),
    "--device_per_process",
    "--",
    f"--flagfile={FLAGFILE}",
    f"--workdir={tmp_path}/run",
    "--seed=3",
  ]
  dry = run(
    "gpu_slurm.sh", [*flags, "--partition=gpu", "--time=2:00:00", "--dry-run", "--", "--seed=3"]
  )
  assert dry.returncode == 0 and len(_calls(log, "sbatch")) == 1  # nothing more submitted
  assert script in dry.stdout and re.search(r"^sbatch --parsable \S+\.sbatch$", dry.stdout, re.M)


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(nodes=0), "--nodes: must be at least 1"),
    (dict(job="evaluate"), "--job: evaluate runs in one process, not 16"),
    (dict(workdir="/proc/version/run"), "--workdir: /proc/version/run lies under /proc/version"),
    (dict(workdir="/proc/sys/r1jax_run"), "--workdir: /proc/sys/r1jax_run is not writable"),
  ],
)
def test_slurm_bad_input_exits_2_before_submitting(fakes, change, message):
  run, log = fakes
  _one_error_line(run("gpu_slurm.sh", _replace(SLURM_FLAGS, **change)), message)
  assert _calls(log, "sbatch") == []


def test_slurm_without_sbatch_says_where_to_run(fakes, tmp_path):
  run, _ = fakes
  proc = run("gpu_slurm.sh", SLURM_FLAGS, path=_path_without_cloud_tools(tmp_path))
  _one_error_line(proc, "sbatch: not found on PATH; run this on the cluster's login node")


@pytest.mark.parametrize(
  "nodelist, hosts",
  [
    ("node7", ["node7"]),
    ("gpu[001-003,7],login1", ["gpu001", "gpu002", "gpu003", "gpu7", "login1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("x1,y[2],z", ["x1", "y2", "z"]),
  ],
)
def test_slurm_nodelists_expand(nodelist, hosts):
  assert worker.expand_nodelist(nodelist) == hosts


def test_worker_reads_the_job_layout_from_slurm():
  slurm = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "5",
    "SLURM_JOB_ID": "123",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
  }
  assert worker.job_environment(slurm, device_per_process=True) == {
    "R1JAX_COORDINATOR_ADDRESS": "gpu01:20123",
    "R1JAX_NUM_PROCESSES": "16",
    "R1JAX_PROCESS_ID": "5",
    "R1JAX_LOCAL_DEVICE_IDS": "5",
  }
  step = {**slurm, "SLURM_STEP_NODELIST": "gpu02"}
  assert worker.job_environment(step, port=999)["R1JAX_COORDINATOR_ADDRESS"] == "gpu02:999"
  # launch.local's own settings win; one task, or no SLURM, is a single process.
  assert worker.job_environment({**slurm, "R1JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
  assert worker.job_environment({**slurm, "SLURM_NTASKS": "1"}) == {}
  assert worker.job_environment({}) == {}
  with pytest.raises(ValueError, match="SLURM_JOB_NODELIST: empty"):
    worker.job_environment({**slurm, "SLURM_JOB_NODELIST": ""})


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_a_slurm_job_runs_its_processes_through_the_worker_like_one_process(fakes, tmp_path):
  """sbatch -> the script -> srun -> 2 x launch.worker -> pretrain over gloo: the losses of one
  8-device process (the same check as launch/local.py's two-process test)."""
  from tests.test_launch_local import PRETRAIN_FLAGS, _losses, _run

  run, log = fakes
  flags = ["--nodes=2", "--per=node", "--gpus_per_node=1", "--job=pretrain"]
  flags += [f"--flagfile={FLAGFILE}", f"--log_dir={tmp_path}/logs", f"--port={_free_port()}"]
  flags += [f"--venv={sys.prefix}", "--noinstall", "--", *PRETRAIN_FLAGS]
  proc = run(
    "gpu_slurm.sh",
    flags,
    timeout=900,
    FAKE_SBATCH_EXECUTE="1",
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (job,) = [c for c in fake_cluster_tools.recorded(log) if isinstance(c, dict) and "job_exit" in c]
  output = open(job["log"]).read()
  assert job["job_exit"] == 0, output[-3000:]
  assert output.count("8 cpu device(s) in 2 process(es)") == 2, output[-3000:]
  single = _run(
    ["-m", "experiments.pretrain", f"--flagfile={FLAGFILE}", *PRETRAIN_FLAGS],
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  assert single.returncode == 0, single.stderr[-3000:]
  lines = [line for line in output.splitlines() if re.match(r"step +\d+/3 +loss", line)]
  expected = _losses(single.stdout)[None]
  assert len(expected) == 3 and sorted(_losses("\n".join(lines))[None]) == sorted(expected * 2)
