"""Runs experiments.pretrain's main on many flag sets in one process, as `python -m
experiments.pretrain FLAGS` runs each: parsed by the same parser, then main; prints, as JSON, each
set's exit code, stdout and stderr. For inputs that stop before training (one interpreter and one
jax start-up for all of them, instead of one each).

  python -m tests.flag_cases '[["--preset=v4"], ["--num_steps=0"]]'
"""

import contextlib
import io
import json
import sys

from absl import flags

from experiments import pretrain
from experiments.flag_errors import parse_flags_or_exit


def run_case(args: list[str]) -> dict:
  out, err = io.StringIO(), io.StringIO()
  code = 0
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      flags.FLAGS.unparse_flags()  # every flag back to its default
      pretrain.main(parse_flags_or_exit(["experiments.pretrain", *args]))
    except SystemExit as stop:
      code = stop.code
  return {"args": args, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
  print(json.dumps([run_case(args) for args in json.loads(sys.argv[1])]))
