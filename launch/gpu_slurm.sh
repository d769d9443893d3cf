#!/usr/bin/env bash
# Multi-node GPU jobs under SLURM: writes the sbatch script, submits it (sbatch), prints the log.
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --job=pretrain \
#     --flagfile=experiments/configs/small_cpu.flags --workdir=/shared/runs/r1 --dry-run
# The logic and its tests live in launch/slurm.py (`launch/gpu_slurm.sh --help` lists every flag).
exec "$(dirname "${BASH_SOURCE[0]}")/python.sh" launch.slurm "$@"
