"""Math answer extraction and equivalence against a table of gold/prediction pairs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reward_math_cases import MATH_CASES  # pylint: disable=g-import-not-at-top,wrong-import-position

from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def test_table_is_large_and_mixed():
  assert len(MATH_CASES) >= 40
  assert sum(e for _, _, e in MATH_CASES) >= 20 and sum(not e for _, _, e in MATH_CASES) >= 15


@pytest.mark.parametrize("gold,pred,expected", MATH_CASES)
def test_equivalence_table(gold, pred, expected):
  assert math_lib.math_equal(gold, pred, in_process=True) is expected


def test_worker_agrees_with_in_process_on_the_table():
  checker = math_lib.MathChecker(timeout_s=10.0)
  try:
    for gold, pred, expected in MATH_CASES[::3]:
      assert checker.equal(gold, pred) is expected, (gold, pred)
    assert checker.timeouts == 0
  finally:
    checker.close()


def test_math_verify_agrees_on_the_table():
  math_verify = pytest.importorskip(
      "math_verify", reason="math-verify is a test dependency (setup.py extras 'test')")
  configs = [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]
  for gold, pred, expected in MATH_CASES:
    got = math_verify.verify(math_verify.parse(f"${gold}$", extraction_config=configs),
                             math_verify.parse(f"${pred}$", extraction_config=configs))
    assert bool(got) is expected, (gold, pred)


def test_hanging_comparison_times_out_and_worker_recovers():
  checker = math_lib.MathChecker(timeout_s=1.5)
  try:
    assert checker.equal("1", "1.0")  # warm the worker (start-up is not the test)
    assert not checker.equal("2", "10^{10^{10^{10}}}")
    assert checker.timeouts == 1
    assert checker.equal("\\sqrt{8}", "2\\sqrt{2}")  # a fresh worker took over
  finally:
    checker.close()


@pytest.mark.parametrize("response,expected", [
    ("so \\boxed{\\frac{1}{2}} or rather \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("The final answer is $42$. I hope it is correct.", "42"),
    ("Adding gives 3, then 7, so in total we get 12 apples in the basket overall today", "12"),
    ("x = 5", "x = 5"),
    ("\\boxed 7.", "7"),
    ("<judge>\nj\n</judge>\n\n<think_on>\n<think>\n\\boxed{1}\n</think>\n"
     "<answer>\nThe answer is \\boxed{2}\n</answer>", "2"),
    ("no digits here at all, just words and more words to exceed forty chars", None),
])
def test_extract_math_answer(response, expected):
  assert math_lib.extract_math_answer(response) == expected


def test_math_reward_uses_the_answer_block():
  response = ("<judge>\nhard\n</judge>\n\n<think_on>\n<think>\nmaybe \\boxed{3}\n</think>\n"
              "<answer>\nSo $x = \\boxed{\\dfrac{6}{4}}$.\n</answer>")
  assert math_lib.math_reward(response, "1.5", in_process=True) == 1.0
  assert math_lib.math_reward(response, "3", in_process=True) == 0.0
  assert math_lib.math_reward("", "3", in_process=True) == 0.0


def test_unsafe_text_is_never_evaluated():
  assert math_lib.to_sympy_source("__import__('os').system('true')") is None
  assert math_lib.to_sympy_source("exit(1)") is None
  assert math_lib.to_sympy_source("2x + \\frac{1}{2}") == "2x + ((1)/(2))"


def test_bad_input_types():
  with pytest.raises(ValueError, match="gold must be str"):
    math_lib.math_equal(3, "3")
  with pytest.raises(ValueError, match="response must be str"):
    math_lib.extract_math_answer(None)
  with pytest.raises(ValueError, match="'answer' or 'value'"):
    math_lib.gold_from_verifier({"type": "math"})


def _slow_interpreter_start(monkeypatch, tmp_path, seconds: float) -> None:
  """Every new Python process (the spawned worker) sleeps `seconds` at start-up, as under
  heavy CPU load; `sitecustomize` on PYTHONPATH runs before anything else."""
  (tmp_path / "sitecustomize.py").write_text(f"import time\ntime.sleep({seconds})\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_worker_start_up_is_not_counted_in_the_comparison_limit(monkeypatch, tmp_path):
  _slow_interpreter_start(monkeypatch, tmp_path, 3.0)
  checker = math_lib.MathChecker(timeout_s=1.0)  # shorter than the start-up
  try:
    assert checker.equal("\\frac{1}{2}", "0.5")  # cold worker: still graded correctly
    assert checker.timeouts == 0 and checker.startup_failures == 0
  finally:
    checker.close()


def _fresh_health(monkeypatch, self_check_passes: bool) -> None:
  """A new `_HEALTH` for this test (the process's own may already have run its check)."""
  # pylint: disable-next=protected-access
  monkeypatch.setattr(math_lib, "_HEALTH", math_lib._new_health())
  if self_check_passes:
    monkeypatch.setattr(math_lib, "_self_check", lambda: None)


def test_a_failed_worker_start_is_retried_and_the_answer_still_graded(monkeypatch):
  _fresh_health(monkeypatch, self_check_passes=True)
  real_start, calls = math_lib._Worker.start, []  # pylint: disable=protected-access

  def fails_once(worker, startup_timeout_s):
    calls.append(startup_timeout_s)
    return "did not report ready" if len(calls) == 1 else real_start(worker, startup_timeout_s)

  monkeypatch.setattr(math_lib._Worker, "start", fails_once)  # pylint: disable=protected-access
  checker = math_lib.MathChecker(timeout_s=5.0)
  try:
    assert checker.verdict("\\frac{1}{2}", "0.5") == math_lib.MathVerdict(True)
    assert checker.startup_failures == 1 and len(calls) == 2
    assert math_lib._HEALTH.failures_in_a_row == 0  # pylint: disable=protected-access
  finally:
    checker.close()
  with pytest.raises(ValueError, match="startup_timeout_s"):
    math_lib.MathChecker(startup_timeout_s=0)


def test_a_worker_that_fails_its_start_up_self_check_raises_infrastructure_error(monkeypatch):
  _fresh_health(monkeypatch, self_check_passes=False)  # the real self-check, failing start
  monkeypatch.setattr(math_lib._Worker, "start",  # pylint: disable=protected-access
                      lambda worker, timeout_s: "did not report ready within 0.5 s")
  checker = math_lib.MathChecker()
  with pytest.raises(math_lib.RewardInfrastructureError,
                     match="SymPy worker failed its start-up self-check: did not report ready"):
    checker.equal("1", "1.0")
  with pytest.raises(math_lib.RewardInfrastructureError):  # and it stays stopped
    math_lib.math_reward("\\boxed{2}", "2", checker=checker)


def test_worker_start_ups_that_keep_failing_raise_at_the_bound(monkeypatch):
  _fresh_health(monkeypatch, self_check_passes=True)
  monkeypatch.setattr(math_lib._Worker, "start",  # pylint: disable=protected-access
                      lambda worker, timeout_s: "ended before reporting ready (exit code 1)")
  checker = math_lib.MathChecker()
  with pytest.raises(math_lib.RewardInfrastructureError,
                     match=f"failed {math_lib.MAX_WORKER_FAILURES_IN_A_ROW} times in a row "
                           r"\(last: ended before reporting ready"):
    checker.equal("1", "1.0")
  assert checker.startup_failures == math_lib.MAX_WORKER_FAILURES_IN_A_ROW


def test_worker_deaths_count_toward_the_bound_and_an_answered_comparison_resets_it(
    monkeypatch):
  _fresh_health(monkeypatch, self_check_passes=True)
  worker_cls = math_lib._Worker  # pylint: disable=protected-access
  monkeypatch.setattr(worker_cls, "start", lambda worker, timeout_s: None)
  monkeypatch.setattr(worker_cls, "alive", lambda worker: True)
  answers = iter([("died", "ended during a comparison (exit code -9)")] * 2 + [("ok", True)] +
                 [("died", "ended during a comparison (exit code -9)")] * 10)
  monkeypatch.setattr(worker_cls, "ask", lambda worker, job, timeout_s: next(answers))
  checker = math_lib.MathChecker()
  died = math_lib.MathVerdict(False, "error",
                              "the SymPy worker ended during a comparison (exit code -9)")
  assert [checker.verdict("1", "2") for _ in range(2)] == [died] * 2
  assert checker.verdict("1", "2") == math_lib.MathVerdict(True)  # answered: count reset
  for _ in range(math_lib.MAX_WORKER_FAILURES_IN_A_ROW - 1):
    assert checker.verdict("1", "2") == died
  with pytest.raises(math_lib.RewardInfrastructureError, match="exit code -9"):
    checker.verdict("1", "2")


def test_a_pathological_answer_is_a_timeout_verdict_not_an_infrastructure_failure():
  checker = math_lib.MathChecker(timeout_s=1.0)
  try:
    verdict = checker.verdict("5", "9^9^9^9")
    assert verdict == math_lib.MathVerdict(
        False, "timeout", "a SymPy comparison ran past its limit of 1 s"), verdict
    assert checker.timeouts == 1
    assert math_lib._HEALTH.failures_in_a_row == 0  # pylint: disable=protected-access
    assert checker.verdict("5", "10/2") == math_lib.MathVerdict(True)  # a fresh worker
  finally:
    checker.close()


def test_nothing_is_printed_at_exit_with_a_comparison_running_and_a_failed_process_start():
  # A process start that raises left a Process without a handle, whose kill() at exit
  # printed an AttributeError; a thread mid-comparison must not print either.
  script = textwrap.dedent("""
      import multiprocessing.context as mc
      from kat_jax.tasks.rewards import math as math_lib, pool as pool_lib
      math_lib._self_check = lambda: None  # (tested elsewhere) the first start is the pool's
      real_start, calls = mc.SpawnProcess.start, []
      def start_fails_once(self):
        calls.append(1)
        if len(calls) == 1:
          raise OSError("simulated: no processes left")
        return real_start(self)
      mc.SpawnProcess.start = start_fails_once
      pool = pool_lib.RewardPool(max_workers=1, item_timeout_s=1.0, math_timeout_s=60.0)
      item = {"response": "\\\\boxed{10^{10^{10^{10}}}}",
              "verifier": {"type": "math", "answer": "2"}}
      print(pool.score([item])[0].status)  # its thread is still comparing at exit
      """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": REPO})
  assert (out.returncode, out.stdout, out.stderr) == (0, "timeout\n", "")
