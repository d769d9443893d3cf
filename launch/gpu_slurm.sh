#!/usr/bin/env bash
# Multi-node GPU jobs under SLURM: writes the sbatch script, submits it (sbatch), prints the log.
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --job=pretrain \
#     --flagfile=experiments/configs/small_cpu.flags --workdir=/shared/runs/r1 --dry-run
# The logic and its tests live in launch/slurm.py (`launch/gpu_slurm.sh --help` lists every flag).
# The interpreter: $R1JAX_PYTHON, else this checkout's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${R1JAX_PYTHON:-}"
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m launch.slurm "$@"
