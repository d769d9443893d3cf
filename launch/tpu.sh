#!/usr/bin/env bash
# Cloud TPU VMs and pod slices: create, copy + install r1jax on every worker, run a job, delete.
#   launch/tpu.sh --name=r1 --zone=us-east5-a --accelerator=v5p-16 --job=pretrain \
#     --flagfile=experiments/configs/tiny_cpu.flags --workdir=gs://BUCKET/runs/r1 --dry-run
# The logic and its tests live in launch/tpu.py (`launch/tpu.sh --help` lists every flag).
exec "$(dirname "${BASH_SOURCE[0]}")/python.sh" launch.tpu "$@"
