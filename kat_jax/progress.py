"""Progress lines for long work (what, done/total, rate, ETA), printed on process 0 only.

    progress = Progress("sft tagging", total=15000, unit="answers")
    for chunk in chunks:
      ...
      progress.update(len(chunk))
    progress.finish()

prints a line when it starts, then at most one line every `every_s` seconds, then a final
line from `finish` (or the end of a `with Progress(...)` block):

    sft tagging: 1,216/15,000 answers | 41.2 answers/s | ETA 05:34

The training loop's per-step line (`kat_jax.train.metrics.MetricsLogger`) uses the same
duration format. Any layer may import this module (it imports nothing of kat_jax).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import jax


def format_duration(seconds: float) -> str:
  """'MM:SS', or 'H:MM:SS' from one hour on."""
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def status(text: str, stream: TextIO | None = None) -> None:
  """One status line (a phase's header or result) on process 0 only."""
  if jax.process_index() == 0:
    print(text, file=stream or sys.stdout, flush=True)


class Progress:
  """Counts work done out of `total` and prints throttled progress lines on process 0.

  what: the phase, e.g. 'sft tagging'; unit: what is counted, e.g. 'answers'.
  every_s: the least seconds between two lines (the start and the final line always print).
  """

  def __init__(self, what: str, total: int, *, unit: str = "items", every_s: float = 10.0,
               stream: TextIO | None = None, active: bool | None = None):
    self.what = what
    self.total = int(total)
    self.unit = unit
    self.every_s = every_s
    self.stream = stream or sys.stdout
    self.active = jax.process_index() == 0 if active is None else active
    self.done = 0
    self._start = time.perf_counter()
    self._print(self._start)

  def update(self, count: int = 1) -> None:
    """Adds `count` finished items; prints a line when `every_s` has passed since the last."""
    self.done += count
    now = time.perf_counter()
    if now - self._last_print >= self.every_s:
      self._print(now)

  def finish(self) -> None:
    """Prints the final line: items done, elapsed time and mean rate."""
    if not self.active:
      return
    elapsed = time.perf_counter() - self._start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    print(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} in "
          f"{format_duration(elapsed)} ({rate:,.1f} {self.unit}/s)", file=self.stream,
          flush=True)

  def line(self, now: float | None = None) -> str:
    """The current progress line (no printing)."""
    elapsed = (now if now is not None else time.perf_counter()) - self._start
    parts = [f"{self.what}: {self.done:,}/{self.total:,} {self.unit}"]
    if self.done > 0 and elapsed > 0:
      rate = self.done / elapsed
      parts.append(f"{rate:,.1f} {self.unit}/s")
      parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
    return " | ".join(parts)

  def _print(self, now: float) -> None:
    self._last_print = now
    if self.active:
      print(self.line(now), file=self.stream, flush=True)

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, exc_type, *_) -> None:
    if exc_type is None:
      self.finish()
