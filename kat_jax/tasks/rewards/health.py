"""Reward infrastructure that cannot run stops the run; its start-up is not an item's time.

Two rewards depend on machinery of their own: code on the sandbox (`code.py`), math on SymPy
worker processes (`math.py`). If that machinery is broken, every reward would be a
meaningless 0, so each keeps one `InfrastructureHealth`: a self-check on first use, and a
bound on failures in a row (never the candidate's doing); both raise
`RewardInfrastructureError` with one message, and stay raised.

Starting that machinery (the self-check, a fresh SymPy worker) can take long on a loaded
machine and does not depend on the candidate, so it is run inside `infrastructure_time()`:
the `ItemClock` that `RewardPool` binds to an item's thread leaves that time out of the
item's limit.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

from kat_jax.errors import RewardInfrastructureError


class InfrastructureHealth:
  """A self-check on first use and a bound on failures in a row; a failure is sticky.

  name: what is checked, as the message starts ("the code sandbox").
  self_check: () -> why the infrastructure cannot be trusted, or None; run once.
  max_failures_in_a_row: failures (`record(why)`) in a row, with no success between, that
    stop the run.
  """

  def __init__(self, name: str, self_check: Callable[[], str | None],
               max_failures_in_a_row: int):
    if max_failures_in_a_row < 1:
      raise ValueError(f"max_failures_in_a_row must be >= 1, got {max_failures_in_a_row}")
    self.name = name
    self.max_failures_in_a_row = max_failures_in_a_row
    self._self_check = self_check
    self._lock = threading.Lock()
    self._checked = False
    self._failure: str | None = None
    self.failures_in_a_row = 0

  def ensure_checked(self) -> None:
    """Runs the self-check on first use; raises if it, or the bound, ever failed."""
    with infrastructure_time(), self._lock:  # waiting for another thread's check is too
      if self._failure is None and not self._checked:
        why = self._self_check()
        self._checked = True
        if why is not None:
          self._failure = f"{self.name} failed its start-up self-check: {why}"
      if self._failure is not None:
        raise RewardInfrastructureError(self._failure)

  def record(self, failure: str | None) -> None:
    """Counts one use: None if it worked, else why it failed. Raises at the bound."""
    with self._lock:
      if failure is None:
        self.failures_in_a_row = 0
      else:
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= self.max_failures_in_a_row and self._failure is None:
          self._failure = (f"{self.name} failed {self.failures_in_a_row} times in a row "
                           f"(last: {failure}); interpreter {sys.executable}")
      if self._failure is not None:
        raise RewardInfrastructureError(self._failure)


class ItemClock:
  """Seconds an item has run, less the time spent inside `excluded()`."""

  def __init__(self):
    self._lock = threading.Lock()
    self._start = time.monotonic()
    self._excluded_s = 0.0
    self._depth = 0
    self._excluded_since = 0.0

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    with self._lock:
      self._depth += 1
      if self._depth == 1:
        self._excluded_since = time.monotonic()
    try:
      yield
    finally:
      with self._lock:
        self._depth -= 1
        if self._depth == 0:
          self._excluded_s += time.monotonic() - self._excluded_since

  def counted_s(self) -> float:
    """Seconds so far that count against the item's limit (an exclusion still running does
    not count)."""
    with self._lock:
      now = time.monotonic()
      running = now - self._excluded_since if self._depth else 0.0
      return now - self._start - self._excluded_s - running


_CURRENT = threading.local()


def bind_item_clock(clock: ItemClock | None) -> None:
  """Makes `clock` the calling thread's item clock (None: none)."""
  _CURRENT.clock = clock


@contextlib.contextmanager
def infrastructure_time() -> Iterator[None]:
  """Time inside is the reward infrastructure's, not the item's (no-op without a clock)."""
  clock = getattr(_CURRENT, "clock", None)
  if clock is None:
    yield
  else:
    with clock.excluded():
      yield
