#!/usr/bin/env bash
# Runs `python -m MODULE ARGS` from this checkout (the launchers' shell entry points call it).
# The interpreter: $R1JAX_PYTHON, else this checkout's .venv, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${R1JAX_PYTHON:-}"
if [[ -z $python ]]; then
  if [[ -x $root/.venv/bin/python ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m "$@"
