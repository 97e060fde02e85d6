"""Code reward: run the candidate with the task's unit tests in the sandbox (spec §6.2).

KAT-V1 §4.2.2 (seed 001): passing all tests yields the full reward, any failure zero.
Two test formats:
  * a string of Python (asserts, or a human-eval style `check(candidate)` with
    `entry_point`), appended to the candidate program;
  * a list of {"input": str, "output": str} stdin/stdout cases, one sandbox run each, output
    compared after stripping trailing whitespace per line.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from kat_jax.tasks.rewards.math import answer_region
from kat_jax.tasks.rewards.sandbox import SandboxLimits, SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str | None:
  """Program text of a response: the last fenced block (```python preferred) inside the
  `<answer>` block, else the whole answer when it has no fence at all. None if empty."""
  if not isinstance(response, str):
    raise ValueError(f"response must be str, got {type(response).__name__}")
  text = answer_region(response)
  blocks = _FENCE.findall(text)
  if blocks:
    python_blocks = [body for lang, body in blocks if lang]
    code = (python_blocks or [body for _, body in blocks])[-1]
  else:
    code = text
  return code if code.strip() else None


def build_program(code: str, tests: str, entry_point: str | None = None) -> str:
  """candidate + tests (+ `check(entry_point)` for human-eval style tests)."""
  program = f"{code}\n\n{tests}\n"
  if entry_point:
    if not entry_point.isidentifier():
      raise ValueError(f"entry_point must be an identifier, got {entry_point!r}")
    program += f"\ncheck({entry_point})\n"
  return program


# main.py for unit tests: reads a one-off token from stdin (the candidate cannot see it: stdin
# is consumed first, and it is not in any file), runs candidate then tests in one namespace,
# and prints the token only when both finished. So `sys.exit(0)` / `os._exit(0)` placed
# before the tests cannot fake a pass. `__name__` is not "__main__", so demo blocks stay off.
_HARNESS = """\
import sys


def _main():
  token = sys.stdin.readline().strip()
  sys.stdin = open("/dev/null")
  namespace = {"__name__": "__candidate__"}
  try:
    for path in ("candidate.py", "tests.py"):
      with open(path, encoding="utf-8") as f:
        source = f.read()
      exec(compile(source, path, "exec"), namespace)
  except SystemExit:
    print("program called exit before the tests finished", file=sys.__stderr__)
    sys.__stderr__.flush()
    import os
    os._exit(1)
  sys.__stdout__.write("\\n" + token + "\\n")
  sys.__stdout__.flush()


_main()
"""


def _run_unit_tests(code: str, tests: str, entry_point: str | None,
                    limits: SandboxLimits | None) -> SandboxResult:
  token = "KAT_TESTS_DONE_" + secrets.token_hex(16)
  if entry_point:
    if not entry_point.isidentifier():
      raise ValueError(f"entry_point must be an identifier, got {entry_point!r}")
    tests = f"{tests}\n\ncheck({entry_point})\n"
  return run_python(_HARNESS, limits=limits, stdin=token + "\n", pass_marker=token,
                    files={"candidate.py": code, "tests.py": tests})


def _io_cases(tests: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
  cases = []
  for i, case in enumerate(tests):
    if not isinstance(case, Mapping) or "input" not in case or "output" not in case:
      raise ValueError(f"tests[{i}] must be a dict with 'input' and 'output'")
    cases.append((str(case["input"]), str(case["output"])))
  return cases


def _same_output(got: str, want: str) -> bool:
  lines = lambda s: [line.rstrip() for line in s.strip().splitlines()]
  return lines(got) == lines(want)


def run_code_tests(code: str, tests: str | Sequence[Mapping[str, Any]], *,
                   entry_point: str | None = None,
                   limits: SandboxLimits | None = None) -> SandboxResult:
  """Sandbox result of the candidate against the tests (first failing io case for io tests).

  Bad `tests` raise ValueError (a data bug, not the candidate's fault).
  """
  if isinstance(tests, str):
    return _run_unit_tests(code, tests, entry_point, limits)
  cases = _io_cases(tests)
  if not cases:
    raise ValueError("tests is an empty list")
  result = None
  for stdin, want in cases:
    result = run_python(code, limits=limits, stdin=stdin)
    if result.status != "pass":
      return result
    if not _same_output(result.stdout, want):
      return SandboxResult(**{**result.__dict__, "status": "fail",
                              "detail": "wrong output"})
  return result


def code_result(response: str, tests: str | Sequence[Mapping[str, Any]], *,
                entry_point: str | None = None,
                limits: SandboxLimits | None = None) -> SandboxResult:
  """Sandbox result (pass/fail/timeout/error + detail) of the code in a response.

  A response without code is a 'fail' that never reaches the sandbox.
  """
  code = extract_code(response)
  if code is None:
    return SandboxResult(status="fail", detail="no code in the response")
  return run_code_tests(code, tests, entry_point=entry_point, limits=limits)


def code_reward(response: str, tests: str | Sequence[Mapping[str, Any]], *,
                entry_point: str | None = None,
                limits: SandboxLimits | None = None) -> float:
  """1.0 if the code in the response passes all tests, else 0.0."""
  return 1.0 if code_result(response, tests, entry_point=entry_point,
                            limits=limits).passed else 0.0
