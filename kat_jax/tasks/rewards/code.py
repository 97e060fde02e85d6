"""Code reward: run the candidate with the task's unit tests in the sandbox (docs/spec.md §6.2).

KAT-V1 report §4.2.2: passing all tests yields the full reward, any failure zero.
Two test formats:
  * a string of Python (asserts, or a human-eval style `check(candidate)` with
    `entry_point`): run in a sandboxed process of its own that calls the candidate's functions,
    which run in a second sandboxed process, through a channel of plain values (channel.py);
  * a list of {"input": str, "output": str} stdin/stdout cases, one sandbox run each, output
    compared by the caller after stripping trailing whitespace per line.
Neither lets the candidate's code reach what decides the verdict (docs/rewards.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from kat_jax.errors import RewardInfrastructureError  # pylint: disable=unused-import  (re-exported)
from kat_jax.tasks.rewards import channel as channel_lib
from kat_jax.tasks.rewards.health import InfrastructureHealth
from kat_jax.tasks.rewards.math import answer_region
from kat_jax.tasks.rewards.sandbox import SandboxLimits, SandboxResult, private_paths, run_python

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


# The two main.py programs of a unit-test run (see channel.py); the channel module is copied
# into both sandboxes as kat_channel.py.
_CANDIDATE_MAIN = "import kat_channel\nkat_channel.serve_candidate()\n"
_TESTS_MAIN = "import kat_channel\nkat_channel.run_tests()\n"
with open(channel_lib.__file__, encoding="utf-8") as _f:
  _CHANNEL_SOURCE = _f.read()


def _run_unit_tests(code: str, tests: str, entry_point: str | None,
                    limits: SandboxLimits | None, prelude: str | None,
                    module_name: str | None = None) -> SandboxResult:
  """Candidate and tests in two sandboxes joined by a plain-value channel; the verdict is the
  tests' process's (it alone knows the pass token)."""
  token = "KAT_TESTS_DONE_" + secrets.token_hex(16)
  to_candidate_r, to_candidate_w = os.pipe()
  to_tests_r, to_tests_w = os.pipe()
  stop = threading.Event()
  box: list[SandboxResult] = []
  candidate = threading.Thread(
      target=lambda: box.append(run_python(
          _CANDIDATE_MAIN, limits=limits, channel_fds=(to_candidate_r, to_tests_w), cancel=stop,
          files={"kat_channel.py": _CHANNEL_SOURCE, "candidate.py": code})),
      daemon=True, name="sandbox-candidate")
  candidate.start()
  files = {"kat_channel.py": _CHANNEL_SOURCE, "tests.py": tests,
           "tests.json": json.dumps({"entry_point": entry_point, "module_name": module_name})}
  if prelude:
    files["prelude.py"] = prelude
  tests_result = run_python(_TESTS_MAIN, limits=limits, stdin=token + "\n", pass_marker=token,
                            channel_fds=(to_tests_r, to_candidate_w), files=files)
  candidate_ended = (tests_result.status == "fail"
                     and tests_result.exit_code == channel_lib.CANDIDATE_ENDED_EXIT)
  if not candidate_ended:
    stop.set()  # the tests are done: a candidate still running has nothing left to answer
  candidate.join()
  return _merge(box[0], tests_result, candidate_ended)


def _merge(candidate: SandboxResult, tests: SandboxResult,
           candidate_ended: bool) -> SandboxResult:
  """One result: the tests' verdict, the candidate's output; when the candidate stopped
  answering, its own status says why (crash, exit, timeout)."""
  stderr = "\n".join(x for x in (candidate.stderr.rstrip("\n"), tests.stderr) if x)
  merged = dataclasses.replace(
      tests, stdout=candidate.stdout, stdout_tail=candidate.stdout_tail,
      stdout_truncated=candidate.stdout_truncated, stderr=stderr,
      stderr_truncated=candidate.stderr_truncated or tests.stderr_truncated,
      candidate=candidate)
  if not candidate_ended:
    return merged
  if candidate.status == "pass":
    return dataclasses.replace(merged, detail="exited before the tests finished")
  return dataclasses.replace(merged, status=candidate.status, exit_code=candidate.exit_code,
                             signal=candidate.signal, detail=candidate.detail)


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


MAX_ERRORS_IN_A_ROW = 8  # sandbox 'error' results (never the candidate's doing) before raising
_SELF_CHECK_LIMITS = SandboxLimits(timeout_s=60.0)  # generous: once per process, maybe loaded


def _self_check() -> str | None:
  """Why the sandbox cannot be trusted to score code, or None: a known-good program must pass
  and a known-bad one fail, for unit tests and for stdin/stdout cases."""
  tests = "assert add(2, 3) == 5\n"
  runs = [("known-good unit test", "pass",
           _run_unit_tests("def add(a, b):\n  return a + b\n", tests, None,
                           _SELF_CHECK_LIMITS, None)),
          ("known-bad unit test", "fail",
           _run_unit_tests("def add(a, b):\n  return a - b\n", tests, None,
                           _SELF_CHECK_LIMITS, None)),
          ("known-good stdin/stdout program", "pass",
           run_python("print(int(input()) + 1)\n", stdin="41\n", limits=_SELF_CHECK_LIMITS))]
  for what, want, result in runs:
    if result.status != want or (what.endswith("program") and result.stdout.strip() != "42"):
      last = (result.stderr.strip().splitlines() or [""])[-1][-300:]
      hint = ""
      private = private_paths()
      if private and result.uid is not None:
        hint = (f"; the program runs as an unprivileged uid, which cannot read {private}: "
                "make them readable by others (chmod o+rX)")
      return (f"a {what} gave {result.status!r} ({result.detail}; {last}), expected "
              f"{want!r}; interpreter {sys.executable}, isolation "
              f"{dict(result.isolation)}{hint}")
  return None


def _new_health() -> InfrastructureHealth:
  # `_self_check` is looked up at each call, so tests can replace it.
  return InfrastructureHealth("the code sandbox", lambda: _self_check(), MAX_ERRORS_IN_A_ROW)


_HEALTH = _new_health()


def check_sandbox() -> None:
  """Runs the sandbox's start-up self-check now (once per process; later calls only re-raise
  a failure): RewardInfrastructureError when the sandbox cannot run programs."""
  _HEALTH.ensure_checked()


def _record(result: SandboxResult) -> None:
  """Counts a sandbox 'error' (setup failure, launcher ended without reporting) toward the
  bound; any other status is the sandbox working."""
  _HEALTH.record((result.detail or "error") if result.status == "error" else None)


def _syntax_error(code: str) -> SandboxResult | None:
  """A 'fail' for code that does not compile, found without starting a sandbox (compiling runs
  nothing; most programs of an untrained policy stop here), else None."""
  try:
    compile(code, "candidate.py", "exec", dont_inherit=True)
  except (SyntaxError, ValueError) as e:  # ValueError: null bytes
    message = "".join(traceback.format_exception_only(type(e), e))
    return SandboxResult(status="fail", exit_code=1, stderr=message,
                         detail=f"does not compile: {type(e).__name__}")
  except (RecursionError, MemoryError):
    pass  # let the sandbox's limits judge it
  return None


def run_code_tests(code: str, tests: str | Sequence[Mapping[str, Any]], *,
                   entry_point: str | None = None, limits: SandboxLimits | None = None,
                   prelude: str | None = None,
                   module_name: str | None = None) -> SandboxResult:
  """Sandbox result of the candidate against the tests (first failing io case for io tests).

  prelude: trusted code run before string tests in the tests' process (e.g. a HumanEval prompt,
    whose helpers the tests call); the candidate cannot replace what it defines.
  module_name: string tests may `import` / `from ... import` the candidate under this name.
  Bad `tests` raise ValueError (a data bug, not the candidate's fault). A sandbox that fails its
  first-use self-check, or `MAX_ERRORS_IN_A_ROW` runs in a row, raises RewardInfrastructureError.
  """
  if isinstance(tests, str):
    for field, name in (("entry_point", entry_point), ("module_name", module_name)):
      if name and not name.isidentifier():
        raise ValueError(f"{field} must be an identifier, got {name!r}")
    _HEALTH.ensure_checked()
    syntax = _syntax_error(code)
    if syntax is not None:
      return syntax
    result = _run_unit_tests(code, tests, entry_point, limits, prelude, module_name)
    _record(result)
    return result
  cases = _io_cases(tests)
  if not cases:
    raise ValueError("tests is an empty list")
  _HEALTH.ensure_checked()
  syntax = _syntax_error(code)
  if syntax is not None:
    return syntax
  result = None
  for stdin, want in cases:
    result = run_python(code, limits=limits, stdin=stdin)
    _record(result)
    if result.status != "pass":
      return result
    if not _same_output(result.stdout, want):
      return dataclasses.replace(result, status="fail", detail="wrong output")
  return result


def code_result(response: str, tests: str | Sequence[Mapping[str, Any]], *,
                entry_point: str | None = None, limits: SandboxLimits | None = None,
                prelude: str | None = None) -> SandboxResult:
  """Sandbox result (pass/fail/timeout/error + detail) of the code in a response.

  A response without code is a 'fail' that never reaches the sandbox.
  """
  code = extract_code(response)
  if code is None:
    return SandboxResult(status="fail", detail="no code in the response")
  return run_code_tests(code, tests, entry_point=entry_point, limits=limits, prelude=prelude)


def code_reward(response: str, tests: str | Sequence[Mapping[str, Any]], *,
                entry_point: str | None = None, limits: SandboxLimits | None = None,
                prelude: str | None = None) -> float:
  """1.0 if the code in the response passes all tests, else 0.0."""
  return 1.0 if code_result(response, tests, entry_point=entry_point, limits=limits,
                            prelude=prelude).passed else 0.0
