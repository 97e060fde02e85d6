"""Math answer extraction and equivalence against a table of gold/prediction pairs."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reward_math_cases import MATH_CASES  # pylint: disable=g-import-not-at-top,wrong-import-position

from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=wrong-import-position


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


def test_worker_that_cannot_start_counts_as_unequal_and_is_retried(monkeypatch, tmp_path):
  _slow_interpreter_start(monkeypatch, tmp_path, 3.0)
  checker = math_lib.MathChecker(timeout_s=1.0, startup_timeout_s=0.5)
  try:
    assert not checker.equal("\\frac{1}{2}", "0.5")
    assert checker.startup_failures == 1 and checker.timeouts == 0
    checker.startup_timeout_s = 60.0
    assert checker.equal("\\frac{1}{2}", "0.5")  # the next call starts a fresh worker
  finally:
    checker.close()
  with pytest.raises(ValueError, match="startup_timeout_s"):
    math_lib.MathChecker(startup_timeout_s=0)
