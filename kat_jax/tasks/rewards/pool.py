"""Reward registry and a pool that scores batches off the training thread.

A scored item is a mapping {"response": str, "verifier": {"type": KIND, ...}} (extra keys are
ignored, so a task record with a "response" added works). Verifier fields per kind (both our
names and those of `kat_jax/autothink/tasks.py` are accepted):

  math     {"answer": str} or {"value": str}
  code     {"tests": str | [{"input", "output"}], "entry_point"?: str, "timeout_s"?: float,
            "prelude"?: str (trusted helpers for string tests, e.g. a HumanEval prompt)}
           (no "timeout_s": the pool's `code_timeout_s`, e.g. config.rl.code_time_limit)
  choice   {"answer": "B"} or {"key": "B"}, "letters"?: "ABCD"
  exact    {"accept": [str, ...]} or {"answer": str}  (normalised string match)
  format   {"mode"?: "think_on" | "think_off"}         (AutoThink layout only)
  general  {"reference"?: str, "keywords"?: [str], "max_chars"?: int}  (heuristic)

Every item gets a `RewardResult`; a reward function that raises or overruns the per-item time
limit gives status 'error'/'timeout' and reward 0.0 instead of breaking the batch. Code items
carry the sandbox's verdict: 'pass' / 'fail' / 'timeout' / 'error' with its detail; math items
'timeout' when a SymPy limit decided a 0. The one exception that does break a batch is
`RewardInfrastructureError`: the code sandbox or the SymPy workers failed their first-use
self-check or too many times in a row (`health.py`), so no score of that kind could be trusted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kat_jax.errors import RewardInfrastructureError
from kat_jax.progress import Progress
from kat_jax.tasks.rewards import choice as choice_lib
from kat_jax.tasks.rewards import code as code_lib
from kat_jax.tasks.rewards import format as format_lib
from kat_jax.tasks.rewards import general as general_lib
from kat_jax.tasks.rewards import health as health_lib
from kat_jax.tasks.rewards import math as math_lib
from kat_jax.tasks.rewards.sandbox import SandboxLimits

STATUSES = ("ok", "pass", "fail", "timeout", "error")
_ITEMS_PER_WORKER_PER_CHUNK = 32  # RewardPool.score with progress: items between two updates


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """reward: float in [0, 1].

  status: 'ok' (scored by a non-code kind), 'pass' / 'fail' (code: the unit tests passed /
  failed, incl. crashes and limit kills), 'timeout' (the sandbox's wall clock or CPU limit, a
  SymPy comparison's limit or answer budget, or the pool's per-item limit), 'error' (bad item,
  a reward function raised, the sandbox could not run this program, or the SymPy worker died
  during a comparison). detail: why, for everything but 'ok' / 'pass'.
  trusted: False when a code verdict came from a sandbox that could not keep the program away
  from the process deciding it (neither a uid of its own nor a pid namespace: the OS refused
  both); such a reward could be forged, see docs/rewards.md.
  """
  reward: float
  status: str = "ok"
  kind: str | None = None
  detail: str = ""
  elapsed_s: float = 0.0
  trusted: bool = True


def _field(verifier: Mapping[str, Any], *names: str) -> Any:
  for name in names:
    if name in verifier:
      return verifier[name]
  raise ValueError(f"{verifier.get('type')} verifier needs one of {names}: {dict(verifier)!r}")


def _math(response: str, verifier: Mapping[str, Any], *, math_checker=None) -> RewardResult:
  verdict = math_lib.math_verdict(response, math_lib.gold_from_verifier(verifier),
                                  checker=math_checker)
  return RewardResult(reward=1.0 if verdict.equal else 0.0, status=verdict.status,
                      detail=verdict.detail)


# A reward function returns a float, or a RewardResult to report its own status/detail.
RewardFn = Callable[..., float | RewardResult]  # fn(response, verifier, *, math_checker=None)
DEFAULT_CODE_TIMEOUT_S = 5.0


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return lines[-1][-200:] if lines else ""


def _code(response: str, verifier: Mapping[str, Any], **_) -> RewardResult:
  limits = SandboxLimits(timeout_s=float(verifier.get("timeout_s", DEFAULT_CODE_TIMEOUT_S)))
  result = code_lib.code_result(response, _field(verifier, "tests"),
                                entry_point=verifier.get("entry_point"), limits=limits,
                                prelude=verifier.get("prelude"))
  # e.g. "exit code 1: AssertionError" - the last stderr line names the exception.
  detail = "; ".join(x for x in (result.detail, _last_line(result.stderr)) if x)
  runs = [r for r in (result, result.candidate) if r is not None and r.isolation]
  return RewardResult(reward=1.0 if result.passed else 0.0, status=result.status,
                      detail=detail, trusted=all(r.contained for r in runs))


def _choice(response: str, verifier: Mapping[str, Any], **_) -> float:
  letters = verifier.get("letters", choice_lib.DEFAULT_LETTERS)
  return choice_lib.choice_reward(response, str(_field(verifier, "answer", "key")), letters)


def _normalize_text(text: str) -> str:
  text = " ".join(text.strip().lower().split())
  return re.sub(r"[.!]+$", "", text.strip("'\"`")).strip()


def _exact(response: str, verifier: Mapping[str, Any], **_) -> float:
  accept = _field(verifier, "accept", "answer")
  accept = [accept] if isinstance(accept, str) else list(accept)
  answer = _normalize_text(math_lib.answer_region(response))
  return 1.0 if answer in {_normalize_text(str(a)) for a in accept} else 0.0


def _format(response: str, verifier: Mapping[str, Any], **_) -> float:
  return format_lib.format_reward(response, required_mode=verifier.get("mode"),
                                  judge_prefilled=bool(verifier.get("judge_prefilled", False)))


def _general(response: str, verifier: Mapping[str, Any], **_) -> float:
  kwargs = {k: verifier[k] for k in ("reference", "keywords", "max_chars", "min_chars",
                                     "min_coverage") if k in verifier}
  return general_lib.general_reward(response, **kwargs)


_REGISTRY: dict[str, RewardFn] = {"math": _math, "code": _code, "choice": _choice,
                                  "exact": _exact, "format": _format, "general": _general}
KINDS = tuple(_REGISTRY)  # the built-in kinds


def get_reward_fn(kind: str) -> RewardFn:
  """Reward function `fn(response, verifier, *, math_checker=None)` of a kind; it returns a
  float or a `RewardResult` (code: the sandbox's status)."""
  if kind not in _REGISTRY:
    raise ValueError(f"unknown reward kind {kind!r}; known: {', '.join(KINDS)}")
  return _REGISTRY[kind]


def register_reward_fn(kind: str, fn: RewardFn, *, replace: bool = False) -> None:
  """Add a kind (e.g. a learned judge); replacing an existing kind needs replace=True."""
  if kind in _REGISTRY and not replace:
    raise ValueError(f"reward kind {kind!r} already registered")
  _REGISTRY[kind] = fn


def _check_item(item: Any) -> tuple[str, Mapping[str, Any], str]:
  if not isinstance(item, Mapping):
    raise ValueError(f"item must be a dict, got {type(item).__name__}")
  response, verifier = item.get("response"), item.get("verifier")
  if not isinstance(response, str):
    raise ValueError("item field 'response' must be str")
  if not isinstance(verifier, Mapping) or not isinstance(verifier.get("type"), str):
    raise ValueError("item field 'verifier' must be a dict with a str 'type'")
  return response, verifier, verifier["type"]


def score_item(item: Mapping[str, Any], *, math_checker=None,
               code_timeout_s: float | None = None) -> RewardResult:
  """Score one item in the calling thread; raises only `RewardInfrastructureError`.

  code_timeout_s: the sandbox wall-clock limit of code items whose verifier has no
  "timeout_s" of its own (None: `DEFAULT_CODE_TIMEOUT_S`).
  """
  start = time.monotonic()
  kind = None
  try:
    response, verifier, kind = _check_item(item)
    if kind == "code" and code_timeout_s is not None and "timeout_s" not in verifier:
      verifier = {**verifier, "timeout_s": code_timeout_s}
    out = get_reward_fn(kind)(response, verifier, math_checker=math_checker)
    elapsed = time.monotonic() - start
    if isinstance(out, RewardResult):
      return dataclasses.replace(out, reward=float(out.reward), kind=kind, elapsed_s=elapsed)
    return RewardResult(reward=float(out), kind=kind, elapsed_s=elapsed)
  except RewardInfrastructureError:
    raise  # no score can be trusted: stop the caller, never a silent 0
  except Exception as e:  # pylint: disable=broad-except  (never break the batch)
    return RewardResult(reward=0.0, status="error", kind=kind,
                        detail=f"{type(e).__name__}: {e}", elapsed_s=time.monotonic() - start)


def check_infrastructure() -> None:
  """The code sandbox's and the SymPy workers' start-up self-checks, now rather than at the
  first reward (which comes after a model is loaded and a first batch generated): a stage that
  scores rewards calls this first, so broken reward infrastructure stops it in seconds.
  RewardInfrastructureError says which cannot run and why."""
  code_lib.check_sandbox()
  math_lib.check_workers()


class RewardPool:
  """Scores batches on background threads; code runs in sandbox processes and SymPy in
  `MathChecker` worker processes, so threads only wait on children.

  Code items without their own "timeout_s" run under `code_timeout_s` (sandbox wall clock).
  Each item runs in its own daemon thread, at most `max_workers` at a time. An item that
  overruns `item_timeout_s` is reported as 'timeout' and its slot is freed at once; its thread
  is abandoned (it ends when the stuck call returns; built-in kinds are bounded by their own
  limits, so only a custom reward function can hang one for good). Time spent starting reward
  infrastructure (a SymPy worker, the sandbox's self-check: `health.infrastructure_time`) is
  not counted, so a loaded machine does not turn right answers into timeouts; that start-up
  has limits of its own and raises `RewardInfrastructureError` when it keeps failing.
  """

  def __init__(self, max_workers: int = 4, item_timeout_s: float = 30.0,
               math_timeout_s: float = 5.0, code_timeout_s: float = DEFAULT_CODE_TIMEOUT_S):
    if max_workers < 1:
      raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if item_timeout_s <= 0:
      raise ValueError(f"item_timeout_s must be > 0, got {item_timeout_s}")
    if code_timeout_s <= 0:
      raise ValueError(f"code_timeout_s must be > 0, got {code_timeout_s}")
    self.max_workers = max_workers
    self.item_timeout_s = item_timeout_s
    self.code_timeout_s = code_timeout_s
    self._math_timeout_s = math_timeout_s
    self._slots = threading.Semaphore(max_workers)
    self._checkers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(max_workers):  # workers start lazily on first use
      self._checkers.put(math_lib.MathChecker(timeout_s=math_timeout_s))
    self._closed = False

  def _run_item(self, item: Mapping[str, Any]) -> RewardResult:
    start = time.monotonic()
    done = threading.Event()
    box: list[RewardResult | RewardInfrastructureError] = []

    def target(clock: health_lib.ItemClock):
      health_lib.bind_item_clock(clock)
      try:
        checker = self._checkers.get_nowait()
      except queue.Empty:  # all held by abandoned (timed-out) items
        checker = math_lib.MathChecker(timeout_s=self._math_timeout_s)
      try:
        box.append(score_item(item, math_checker=checker, code_timeout_s=self.code_timeout_s))
      except RewardInfrastructureError as e:
        box.append(e)
      finally:
        self._checkers.put(checker)
        done.set()

    with self._slots:
      clock = health_lib.ItemClock()  # from here: waiting for a slot is not the item's time
      threading.Thread(target=target, args=(clock,), daemon=True, name="reward-item").start()
      finished = self._wait(done, clock)
    if finished and box:
      if isinstance(box[0], RewardInfrastructureError):
        raise box[0]
      return box[0]
    kind = item.get("verifier", {}).get("type") if isinstance(item, Mapping) else None
    return RewardResult(reward=0.0, status="timeout", kind=kind,
                        detail=f"item took longer than {self.item_timeout_s}s",
                        elapsed_s=time.monotonic() - start)

  def _wait(self, done: threading.Event, clock: health_lib.ItemClock) -> bool:
    """Waits until the item is done (True) or its counted time reaches item_timeout_s."""
    while True:
      left = self.item_timeout_s - clock.counted_s()
      if left <= 0:
        return done.is_set()
      if done.wait(left):
        return True

  def score_async(self, items: Sequence[Mapping[str, Any]]
                  ) -> concurrent.futures.Future[list[RewardResult]]:
    """Future of one `RewardResult` per item, in order. Never fails for bad items; fails with
    `RewardInfrastructureError` when the code sandbox or the SymPy workers cannot run
    (`health.py`), so broken infrastructure stops the caller instead of scoring 0s."""
    if self._closed:
      raise ValueError("RewardPool is closed")
    items = list(items)
    future: concurrent.futures.Future = concurrent.futures.Future()
    results: list[RewardResult | None] = [None] * len(items)
    remaining = [len(items)]
    lock = threading.Lock()

    def run(i):
      try:
        result = self._run_item(items[i])
      except RewardInfrastructureError as e:  # the whole batch is void
        with lock:
          if not future.done():
            future.set_exception(e)
        return
      except BaseException as e:  # pylint: disable=broad-except
        result = RewardResult(reward=0.0, status="error", detail=f"{type(e).__name__}: {e}")
      with lock:
        results[i] = result
        remaining[0] -= 1
        last = remaining[0] == 0
        if last and not future.done():
          future.set_result(results)

    if not items:
      future.set_result([])
    for i in range(len(items)):
      threading.Thread(target=run, args=(i,), daemon=True, name="reward-wait").start()
    return future

  def score(self, items: Sequence[Mapping[str, Any]], progress: Progress | None = None
            ) -> list[RewardResult]:
    """One `RewardResult` per item, in order; `progress` counts items as chunks finish."""
    if progress is None:
      return self.score_async(items).result()
    items, results = list(items), []
    chunk = _ITEMS_PER_WORKER_PER_CHUNK * self.max_workers  # keeps every worker busy
    for start in range(0, len(items), chunk):
      results += self.score_async(items[start:start + chunk]).result()
      progress.update(min(chunk, len(items) - start))
    return results

  def close(self) -> None:
    self._closed = True
    while not self._checkers.empty():
      self._checkers.get().close()

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
