"""The replayable flagfile of a run: the experiment's own flags, resolved, one per line."""

from __future__ import annotations

import sys

from absl import flags


def replayable_flags(modules: tuple[str, ...] = (), header: str = "") -> str:
  """Every flag the running experiment module (and `modules`) defines, as `--name=value` lines.

  Only the experiment's flags are written (not absl's logging flags), so the file reads as the
  run's configuration; `--flagfile=<it>` reruns the run. Flags given on the command line after
  the flagfile override it, e.g. a new `--workdir`.

  Args:
    modules: the modules besides the running one (`__main__` under `-m`) whose flags are the
      experiment's, e.g. the shared flags of the training experiments.
    header: a comment line to put first (without the leading '#').
  """
  defined = flags.FLAGS.flags_by_module_dict()
  own = defined.get("__main__", []) or defined.get(sys.argv[0], [])
  for module in modules:
    own = own + defined.get(module, [])
  lines = [f"# {header}"] if header else []
  lines += [f.serialize() for f in sorted(own, key=lambda f: f.name) if f.name != "flagfile"]
  return "\n".join(line for line in lines if line) + "\n"
