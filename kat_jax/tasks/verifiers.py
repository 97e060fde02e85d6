"""Task verifiers: is a candidate answer right for a generated task? (docs/spec.md §6: 1 or 0).

A thin layer over `kat_jax.tasks.rewards`, so SFT tagging, evaluation and RL score answers
the same way — math by SymPy equivalence in a time-limited worker, code by unit tests in
the sandbox, multiple choice by the first option letter, lookups by normalised string
match. Verifier specs (`tasks.Task.verifier`):

  {"type": "exact", "accept": [str, ...]}   {"type": "math", "value": str}
  {"type": "code", "tests": str}            {"type": "choice", "key": "A".."D"}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kat_jax.progress import Progress
from kat_jax.tasks.rewards import RewardPool

VERIFIER_TYPES = ("exact", "math", "code", "choice")
_REQUIRED_FIELD = {"exact": "accept", "math": "value", "code": "tests", "choice": "key"}


def check_spec(spec: Mapping[str, Any]) -> str:
  """The spec's type; ValueError naming what is wrong with a malformed spec."""
  kind = spec.get("type") if isinstance(spec, Mapping) else None
  if kind not in VERIFIER_TYPES:
    raise ValueError(f"verifier spec needs 'type' in {VERIFIER_TYPES}, got {spec!r}")
  if _REQUIRED_FIELD[kind] not in spec:
    raise ValueError(f"{kind} verifier spec misses field {_REQUIRED_FIELD[kind]!r}: {spec!r}")
  return kind


def verifier_pool(time_limit: float = 2.0, workers: int = 2) -> RewardPool:
  """The RewardPool `verify_many` scores with; pass one to several calls to share its workers."""
  return RewardPool(max_workers=workers, item_timeout_s=time_limit + 5.0,
                    code_timeout_s=time_limit)  # the sandbox limit of each code run


def verify_many(specs: Sequence[Mapping[str, Any]], candidates: Sequence[str | None], *,
                time_limit: float = 2.0, workers: int = 2,
                pool: RewardPool | None = None,
                progress: Progress | None = None) -> list[bool]:
  """[N] bools: candidate answers (the text inside `<answer>`) against specs. None -> False.

  `pool` (from `verifier_pool`, left open) replaces `time_limit`/`workers`; without it a pool
  is made and closed here. `progress` counts every candidate as it is scored.
  """
  if len(specs) != len(candidates):
    raise ValueError(f"{len(specs)} specs but {len(candidates)} candidates")
  for spec in specs:
    check_spec(spec)
  items = [(i, {"response": f"<answer>\n{c}\n</answer>", "verifier": s})
           for i, (s, c) in enumerate(zip(specs, candidates)) if c is not None]
  results = [False] * len(specs)
  if progress is not None and len(items) < len(specs):
    progress.update(len(specs) - len(items))  # None candidates: nothing to score
  if not items:
    return results
  owned = pool is None
  if owned:
    pool = verifier_pool(time_limit, workers)
  try:
    scored = pool.score([item for _, item in items], progress)
  finally:
    if owned:
      pool.close()
  for (i, _), result in zip(items, scored):
    results[i] = result.reward >= 1.0
  return results


def verify(spec: Mapping[str, Any], candidate: str | None) -> bool:
  """One candidate answer against a verifier spec."""
  return verify_many([spec], [candidate])[0]
