"""Fake `gcloud`, `sbatch` and `srun` for the launcher tests: each appends its argv (one JSON
list per line) to $FAKE_LOG and acts just enough for the launcher to go on.

gcloud: `queued-resources describe` prints the next of $FAKE_TPU_STATES (comma list; the last
repeats); `storage cp` fails like a 403 when $FAKE_GCS_DENY is set; `tpu-vm scp` also records
the tarball's member names and its launch.flags text; `tpu-vm ssh` of the run exits
$FAKE_RUN_EXIT (default 0).
sbatch: records the script's text and prints a job id; with $FAKE_SBATCH_EXECUTE it runs the
script itself before returning, as SLURM would on the first node (SLURM_NTASKS from the #SBATCH
header, output into the --output file), and records the job's exit code.
srun: records; with $FAKE_SBATCH_EXECUTE starts SLURM_NTASKS copies of its command (all on
"localhost"), each with its SLURM_PROCID, and exits with the first non-zero code.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import time

_SCRIPT = """#!{python}
import sys
sys.path.insert(0, {here!r})
import fake_cluster_tools
sys.exit(fake_cluster_tools.{entry}(sys.argv[1:]))
"""


def install(bin_dir: str) -> None:
  """Writes the three fakes into bin_dir (put it first on PATH)."""
  here = os.path.dirname(os.path.abspath(__file__))
  for name in ("gcloud", "sbatch", "srun"):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
      f.write(_SCRIPT.format(python=sys.executable, here=here, entry=f"fake_{name}"))
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def _record(entry) -> None:
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(entry) + "\n")


def recorded(log: str) -> list:
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [json.loads(line) for line in f]


def fake_gcloud(argv: list[str]) -> int:
  _record(["gcloud", *argv])
  words = [a for a in argv if not a.startswith("--")]
  if words[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = os.environ.get("FAKE_TPU_STATES", "ACTIVE").split(",")
    counter = os.environ["FAKE_LOG"] + ".describes"
    seen = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as f:
      f.write(str(seen + 1))
    print(states[min(seen, len(states) - 1)])
  elif words[:2] == ["storage", "cp"] and os.environ.get("FAKE_GCS_DENY"):
    print(
      "ERROR: AccessDeniedException: 403 caller does not have storage.objects.create",
      file=sys.stderr,
    )
    return 1
  elif words[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    with tarfile.open(words[4]) as tar:
      flags = tar.extractfile("launch.flags").read().decode()
      _record({"tarball": sorted(tar.getnames()), "launch.flags": flags})
  elif words[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a for a in argv if a.startswith("--command="))
    if "launch.worker" in command:
      return int(os.environ.get("FAKE_RUN_EXIT", "0"))
  return 0


def fake_sbatch(argv: list[str]) -> int:
  script = open(argv[-1]).read()
  _record(["sbatch", *argv])
  _record({"script": script})
  job_id = "4242"
  print(job_id)
  if not os.environ.get("FAKE_SBATCH_EXECUTE"):
    return 0
  header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
  tasks = int(header["nodes"]) * int(header["ntasks-per-node"])
  env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_NTASKS": str(tasks)}
  env["SLURM_JOB_NODELIST"] = "localhost"
  # As SLURM: the job's output goes to the --output file (%x job name, %j job id).
  log = header["output"].replace("%x", header["job-name"]).replace("%j", job_id)
  with open(log, "w") as out:
    code = subprocess.run(["bash", argv[-1]], env=env, stdout=out, stderr=subprocess.STDOUT)
  _record({"job_exit": code.returncode, "log": log})
  return 0


def fake_srun(argv: list[str]) -> int:
  _record(["srun", *argv])
  if not os.environ.get("FAKE_SBATCH_EXECUTE"):
    return 0
  command = [a for a in argv if not a.startswith("--kill-on-bad-exit")]
  tasks = int(os.environ["SLURM_NTASKS"])
  procs = []
  for i in range(tasks):
    env = {**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}
    env["SLURM_STEP_NODELIST"] = "localhost"
    procs.append(subprocess.Popen(command, env=env))
  while True:  # --kill-on-bad-exit: one failure stops the rest (they would wait forever)
    codes = [p.poll() for p in procs]
    failed = next((c for c in codes if c not in (None, 0)), None)
    if failed is not None or all(c == 0 for c in codes):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  return failed or 0
