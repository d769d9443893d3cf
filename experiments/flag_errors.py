"""Bad input -> one line naming the flag or field and the fix, exit code 2, before any compile."""

from __future__ import annotations

import argparse
import sys

from absl import flags


def exit_on_bad_input(message: str) -> None:
  """Prints `error: <message>` on one line to stderr and exits 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl's parser, but a malformed or unknown flag exits 2 with one line (absl's own exits 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    exit_on_bad_input(f"{err}; see --helpfull")
    raise  # unreachable: exit_on_bad_input exits


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the launchers: a bad flag is one `error:` line and exit 2 (argparse's own
  prints the usage first)."""

  def error(self, message):
    exit_on_bad_input(f"{message}; see --help")
