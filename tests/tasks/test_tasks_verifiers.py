"""Dual-regime task generator (determinism, coverage, sizes) and the verifiers."""

from __future__ import annotations

import numpy as np
import pytest

from kat_jax.autothink import tagging
from kat_jax.tasks import dual_regime as tasks, verifiers


def test_generation_is_deterministic_and_seed_dependent():
  a = [t.to_record() for t in tasks.generate_tasks(50, seed=7)]
  b = [t.to_record() for t in tasks.generate_tasks(50, seed=7)]
  c = [t.to_record() for t in tasks.generate_tasks(50, seed=8)]
  assert a == b
  assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
  # A prefix of a longer stream is the same tasks.
  assert [t.to_record() for t in tasks.generate_tasks(20, seed=7)] == a[:20]


def test_both_regimes_every_kind_and_short_texts():
  ts = tasks.generate_tasks(600, seed=0)
  kinds = {(t.regime, t.kind) for t in ts}
  assert kinds == {(r, k) for r, gens in tasks.GENERATORS.items() for k in gens}
  assert {t.domain for t in ts} == set(tasks.DOMAINS)
  for t in ts:
    assert (t.difficulty == 1) == (t.regime == "easy")
    assert 10 <= len(t.prompt) <= 120, t.prompt
    assert len(t.think) <= 120 and len(t.answer) <= 100
    assert set(t.judge) == {"think_on", "think_off"}
  hard = np.mean([t.regime == "hard" for t in tasks.generate_tasks(400, 1, hard_fraction=0.25)])
  assert 0.18 < hard < 0.32


def test_verifiers_accept_references_and_reject_wrong_answers():
  ts = tasks.generate_tasks(160, seed=3)
  specs = [t.verifier for t in ts]
  assert all(verifiers.verify_many(specs, [t.answer for t in ts]))
  rng = np.random.default_rng(0)
  wrong = [tagging.wrong_answer(t, rng) for t in ts]
  assert not any(verifiers.verify_many(specs, wrong))
  assert not any(verifiers.verify_many(specs, [None] * len(ts)))


def test_math_verifier_uses_symbolic_equivalence_and_never_evals_names():
  math = lambda value: {"type": "math", "value": value}
  assert verifiers.verify_many([math("5"), math("5"), math("20")],
                               ["x = 5", "10/2", "(2 + 3) * 4."]) == [True] * 3
  assert verifiers.verify_many([math("5"), math("5")],
                               ["5.1", "__import__('os').getcwd()"]) == [False, False]


def test_choice_and_exact_verifiers():
  choice = {"type": "choice", "key": "B"}
  exact = {"type": "exact", "accept": ["Paris"]}
  assert verifiers.verify_many([choice, choice, choice, exact, exact],
                               ["B) 30", "A", "The answer is: B", " paris. ", "Lyon"]) == [
                                   True, False, True, True, False]


def test_code_verifier_isolates_timeouts_crashes_and_exits():
  spec = {"type": "code", "tests": "assert f(2) == 4"}
  programs = ["def f(x): return 2 * x", "def f(x):\n  while True: pass",
              "import os\nos._exit(0)", "def f(x): return x",
              "print('noise')\ndef f(x): return x*x"]
  assert verifiers.verify_many([spec] * 5, programs, time_limit=0.5) == [
      True, False, False, False, True]


def test_malformed_specs_are_named():
  with pytest.raises(ValueError, match="2 specs but 1"):
    verifiers.verify_many([{"type": "math", "value": "1"}] * 2, ["1"])
  with pytest.raises(ValueError, match="misses field 'tests'"):
    verifiers.verify({"type": "code"}, "x")
  with pytest.raises(ValueError, match="verifier spec"):
    verifiers.verify({"type": "regex"}, "x")


@pytest.mark.parametrize("suffix", [".jsonl", ".array_record"])
def test_write_and_read_tasks(tmp_path, suffix):
  path = tmp_path / f"tasks{suffix}"
  assert tasks.write_tasks(path, 12, seed=5) == 12
  assert tasks.read_tasks(path) == tasks.generate_tasks(12, seed=5)


def test_read_tasks_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"id": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl line 1: field 'prompt'"):
    tasks.read_tasks(path)


def test_minimal_user_records_are_completed():
  t = tasks.Task.from_record({"prompt": "2+3?", "answer": "5", "verifier": "math"}, "f:1")
  assert (t.id, t.kind, t.domain, t.regime, t.difficulty, t.think) == (
      "f:1", "user", "", None, None, None)
  assert t.verifier == {"type": "math", "value": "5"} and set(t.judge) == {"think_on",
                                                                           "think_off"}
  assert verifiers.verify(t.verifier, "5") and not verifiers.verify(t.verifier, "6")
  exact = tasks.Task.from_record({"prompt": "Capital of Peru?", "answer": "Lima",
                                  "verifier": "exact", "domain": "general", "judge": "Recall."})
  assert exact.verifier == {"type": "exact", "accept": ["Lima"]} and exact.domain == "general"
  assert exact.judge == {"think_on": "Recall.", "think_off": "Recall."}
  code = {"type": "code", "tests": "assert f(1) == 2"}
  assert tasks.Task.from_record({"prompt": "p", "answer": "def f(x): return x + 1",
                                 "verifier": code}).verifier == code
  for record, field in [
      ({"prompt": "p", "answer": "a"}, "'verifier': missing"),
      ({"prompt": "p", "answer": "a", "verifier": "code"}, "'verifier': 'code' needs"),
      ({"prompt": "p", "answer": "a", "verifier": "regex"}, "'verifier': 'regex' not in"),
      ({"prompt": "p", "answer": "E", "verifier": "choice"}, "'verifier': choice key"),
      ({"prompt": "p", "answer": "a", "verifier": {"type": "math"}}, "'verifier': math"),
      ({"prompt": "", "answer": "a", "verifier": "exact"}, "'prompt'"),
      ({"prompt": "p", "answer": "a", "verifier": "exact", "regime": "mid"}, "'regime'"),
      ({"prompt": "p", "answer": "a", "verifier": "exact", "judge": 3}, "'judge'"),
  ]:
    with pytest.raises(ValueError, match=f"field {field}"):
      tasks.Task.from_record(record)
