"""Registry dispatch and the background scoring pool."""

from __future__ import annotations

import os
import time

import pytest

from kat_jax.tasks import dual_regime as autothink_tasks
from kat_jax.data.chat_template import format_autothink_response
from kat_jax.tasks.rewards import pool as pool_lib


def _item(answer: str, verifier: dict) -> dict:
  return {"response": format_autothink_response("j", "think_off", answer),
          "verifier": verifier}


def test_registry_kinds_and_errors():
  for kind in ("math", "code", "choice", "format", "general", "exact"):
    assert callable(pool_lib.get_reward_fn(kind))
  with pytest.raises(ValueError, match="unknown reward kind"):
    pool_lib.get_reward_fn("vibes")
  with pytest.raises(ValueError, match="already registered"):
    pool_lib.register_reward_fn("math", lambda *a, **k: 1.0)


def test_score_item_dispatch_on_both_field_spellings():
  cases = [
      (_item("\\boxed{0.5}", {"type": "math", "answer": "\\frac{1}{2}"}), 1.0),
      (_item("x = 7", {"type": "math", "value": "7"}), 1.0),  # autothink spelling
      (_item("B", {"type": "choice", "answer": "B"}), 1.0),
      (_item("C", {"type": "choice", "key": "B"}), 0.0),
      (_item("Paris.", {"type": "exact", "accept": ["paris"]}), 1.0),
      (_item("fine answer", {"type": "format", "mode": "think_off"}), 1.0),
      (_item("fine answer", {"type": "general"}), 1.0),
  ]
  for item, expected in cases:
    result = pool_lib.score_item(item)
    assert result.status == "ok", result
    assert result.reward == expected, (item, result)


def test_bad_items_become_error_results():
  for item in ("not a dict", {"response": 3, "verifier": {"type": "math"}},
               {"response": "x", "verifier": {"type": "math"}},
               {"response": "x", "verifier": {"type": "nope"}}):
    result = pool_lib.score_item(item)
    assert result.status == "error" and result.reward == 0.0 and result.detail


def test_autothink_task_verifiers_score_their_reference_answers():
  records = _some_task_records()
  assert {r["verifier"]["type"] for r in records} >= {"math", "code", "choice", "exact"}
  items = [_item(r["answer"], r["verifier"]) for r in records]
  with pool_lib.RewardPool(max_workers=2, item_timeout_s=20.0) as pool:
    results = pool.score(items)
  assert [r.status for r in results] == [
      "pass" if item["verifier"]["type"] == "code" else "ok" for item in items], results
  assert [r.reward for r in results] == [1.0] * len(items), results


def _some_task_records() -> list[dict]:
  """Two tasks of each verifier type from the AutoThink task generator."""
  per_type: dict[str, list[dict]] = {}
  for task in autothink_tasks.generate_tasks(200, seed=0):
    bucket = per_type.setdefault(task.verifier["type"], [])
    if len(bucket) < 2:
      bucket.append(task.to_record())
  return [r for bucket in per_type.values() for r in bucket]


def test_pool_parallel_scoring_hang_and_exception():
  calls = []

  def hang(response, verifier, **_):
    time.sleep(30)
    return 1.0

  def boom(response, verifier, **_):
    raise RuntimeError("reward fn exploded")

  def slow_ok(response, verifier, **_):
    calls.append(time.monotonic())
    time.sleep(0.3)
    return 1.0

  for name, fn in (("test_hang", hang), ("test_boom", boom), ("test_slow", slow_ok)):
    pool_lib.register_reward_fn(name, fn, replace=True)
  items = ([_item("a", {"type": "test_hang"}), _item("a", {"type": "test_boom"})] +
           [_item("a", {"type": "test_slow"}) for _ in range(4)] +
           [_item("\\boxed{4}", {"type": "math", "answer": "4"})])
  with pool_lib.RewardPool(max_workers=3, item_timeout_s=1.5) as pool:
    start = time.monotonic()
    future = pool.score_async(items)
    assert not future.done()  # scoring happens off the calling thread
    results = future.result(timeout=20)
    elapsed = time.monotonic() - start
  assert results[0].status == "timeout" and results[0].reward == 0.0
  assert results[1].status == "error" and "exploded" in results[1].detail
  assert [r.reward for r in results[2:6]] == [1.0] * 4
  assert results[6].reward == 1.0 and results[6].kind == "math"
  assert elapsed < 8.0  # the hanging item did not hold the batch for its 30 s
  # 4 slow items on the 2 slots left beside the hanging one: parallel, not serial.
  assert max(calls) - min(calls) < 1.2


def test_code_status_and_detail_survive_the_pool():
  tests = "assert f(2) == 4\n"
  answers = {
      "pass": "def f(x):\n  return 2 * x",
      "loop": "def f(x):\n  while True:\n    pass",
      "crash": "import ctypes\nctypes.string_at(0)",  # segfault
      "raise": "def f(x):\n  raise ZeroDivisionError('boom')",
      "none": "   ",
  }
  items = [_item(a, {"type": "code", "tests": tests}) for a in answers.values()]
  # code_timeout_s reaches the sandbox (the loop is cut after 1 s, not the 5 s default)
  with pool_lib.RewardPool(max_workers=2, item_timeout_s=20.0, code_timeout_s=1.0) as pool:
    results = dict(zip(answers, pool.score(items)))
  assert [r.reward for r in results.values()] == [1.0, 0.0, 0.0, 0.0, 0.0], results
  assert results["pass"].status == "pass" and results["pass"].kind == "code"
  if os.getuid() == 0:  # one-off uid and pid namespace on this machine
    assert all(r.trusted for r in results.values()), results
  loop = results["loop"]
  assert loop.status == "timeout" and "wall clock > 1.0s" in loop.detail, loop
  assert loop.elapsed_s < 4.0
  assert results["crash"].status == "fail" and "signal 11" in results["crash"].detail
  assert results["raise"].status == "fail" and "ZeroDivisionError" in results["raise"].detail
  assert results["none"].status == "fail" and "no code" in results["none"].detail
  # an explicit per-task limit wins over the pool's
  item = _item(answers["loop"], {"type": "code", "tests": tests, "timeout_s": 0.5})
  result = pool_lib.score_item(item, code_timeout_s=30.0)
  assert result.status == "timeout" and "wall clock > 0.5s" in result.detail
  with pytest.raises(ValueError, match="code_timeout_s"):
    pool_lib.RewardPool(code_timeout_s=0.0)


def test_empty_batch_and_closed_pool():
  pool = pool_lib.RewardPool(max_workers=1)
  assert pool.score([]) == []
  pool.close()
  with pytest.raises(ValueError, match="closed"):
    pool.score_async([])


def test_code_rewards_from_an_uncontained_sandbox_are_flagged_untrusted(monkeypatch):
  from kat_jax.tasks.rewards import code as code_lib  # pylint: disable=g-import-not-at-top
  from kat_jax.tasks.rewards.sandbox import SandboxResult  # pylint: disable=g-import-not-at-top
  # neither a uid of its own nor a pid namespace: the program could reach the verdict
  bare = SandboxResult(status="pass", isolation={"uid_drop": False, "pid": False, "net": True})
  monkeypatch.setattr(code_lib, "code_result", lambda *a, **k: bare)
  result = pool_lib.score_item(_item("x", {"type": "code", "tests": "assert True"}))
  assert result.reward == 1.0 and result.trusted is False
  contained = SandboxResult(status="pass", isolation={"uid_drop": False, "pid": True})
  monkeypatch.setattr(code_lib, "code_result", lambda *a, **k: contained)
  assert pool_lib.score_item(_item("x", {"type": "code", "tests": "assert True"})).trusted


def _fresh_math_health(monkeypatch, self_check_passes: bool) -> None:
  from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  monkeypatch.setattr(math_lib, "_HEALTH", math_lib._new_health())
  if self_check_passes:
    monkeypatch.setattr(math_lib, "_self_check", lambda: None)


def test_a_math_worker_start_slower_than_the_item_limit_still_gives_the_right_verdict(
    monkeypatch):
  from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=g-import-not-at-top
  _fresh_math_health(monkeypatch, self_check_passes=True)
  worker_cls = math_lib._Worker  # pylint: disable=protected-access
  real_start, item_timeout_s = worker_cls.start, 1.0

  def slow_start(worker, startup_timeout_s):
    time.sleep(item_timeout_s + 1.0)  # as under heavy CPU load
    return real_start(worker, startup_timeout_s)

  monkeypatch.setattr(worker_cls, "start", slow_start)
  items = [_item("10/2", {"type": "math", "value": "5"}),
           _item("\\boxed{5.1}", {"type": "math", "answer": "5"})]
  with pool_lib.RewardPool(max_workers=1, item_timeout_s=item_timeout_s) as pool:
    results = pool.score(items)
  assert [(r.reward, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok")], results
  assert results[0].elapsed_s > item_timeout_s  # the start-up did take longer than the limit


def test_math_workers_that_cannot_start_stop_score_item_and_the_pool(monkeypatch):
  from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=g-import-not-at-top
  _fresh_math_health(monkeypatch, self_check_passes=False)  # the real self-check, failing
  monkeypatch.setattr(math_lib._Worker, "start",  # pylint: disable=protected-access
                      lambda worker, timeout_s: "ended before reporting ready (exit code 1)")
  item = _item("10/2", {"type": "math", "value": "5"})
  with pytest.raises(pool_lib.RewardInfrastructureError,
                     match="SymPy worker failed its start-up self-check: ended before"):
    pool_lib.score_item(item, math_checker=math_lib.MathChecker())
  with pool_lib.RewardPool(max_workers=2) as pool:
    with pytest.raises(pool_lib.RewardInfrastructureError, match="SymPy worker"):
      pool.score([item, _item("B", {"type": "choice", "answer": "B"})])


def test_a_pathological_math_answer_scores_0_with_status_timeout_in_the_pool():
  items = [_item("\\boxed{9^9^9^9}", {"type": "math", "answer": "5"}),
           _item("\\boxed{10/2}", {"type": "math", "answer": "5"})]
  with pool_lib.RewardPool(max_workers=1, item_timeout_s=30.0, math_timeout_s=1.0) as pool:
    tower, right = pool.score(items)
  assert (tower.reward, tower.status) == (0.0, "timeout"), tower
  assert tower.detail == "a SymPy comparison ran past its limit of 1 s"
  assert (right.reward, right.status) == (1.0, "ok"), right
