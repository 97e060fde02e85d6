"""What every launcher shares: printing or running shell commands, and quoting run arguments."""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence


class Shell:
  """Runs commands, or with `dry_run` only prints them (one per line, shell-quoted)."""

  def __init__(self, dry_run: bool, stream=None):
    self.dry_run = dry_run
    self.stream = stream or sys.stdout
    self.history: list[str] = []

  def run(self, argv: Sequence[str], *, check: bool = True, capture: bool = False) -> str:
    """Runs `argv`; returns its stdout when `capture` (dry run: '')."""
    line = shlex.join(argv)
    self.history.append(line)
    if self.dry_run:
      print(line, file=self.stream, flush=True)
      return ""
    result = subprocess.run(list(argv), check=check, text=True,
                            stdout=subprocess.PIPE if capture else None)
    return result.stdout if capture else ""

  def status(self, argv: Sequence[str]) -> int:
    """Runs `argv` streaming its output; returns the exit code (dry run: 0)."""
    line = shlex.join(argv)
    self.history.append(line)
    if self.dry_run:
      print(line, file=self.stream, flush=True)
      return 0
    return subprocess.run(list(argv), check=False).returncode


def run_command(run_args: Sequence[str], python: str = "python3") -> str:
  """The experiment command every worker runs, as one shell string."""
  return shlex.join([python, "-m", "experiments.run", *run_args])
