"""SRPO's data schedule (Kwaipilot, arXiv 2504.14286): two-stage cross-domain training and
history resampling.

- `TwoStageMix`: stage 1 samples prompts from one domain mix (SRPO: hard math only, to grow
  long reasoning), stage 2 from another (math + code) after `switch_step`.
- `HistoryResampler`: after each epoch, prompts whose rollouts were *all* correct are
  dropped (no advantage variance, no gradient); mixed and all-wrong prompts stay — unlike
  DAPO's dynamic sampling, which also drops all-wrong groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class TwoStageMix:
  stage1: Mapping[str, float]  # domain -> sampling weight
  stage2: Mapping[str, float]
  switch_step: int

  def weights(self, step: int) -> Mapping[str, float]:
    return self.stage1 if step < self.switch_step else self.stage2

  def sample_domains(self, step: int, count: int, rng: np.random.Generator) -> list[str]:
    mix = {d: w for d, w in self.weights(step).items() if w > 0}
    if not mix:
      raise ValueError(f"the data mix at step {step} has no positive weight")
    domains = sorted(mix)
    p = np.array([mix[d] for d in domains], np.float64)
    return list(rng.choice(domains, size=count, p=p / p.sum()))


class HistoryResampler:
  """Keeps the prompt pool; `end_epoch` drops prompts solved by every rollout."""

  def __init__(self, prompt_ids: Sequence[Hashable]):
    self.active = list(prompt_ids)
    self._history: dict[Hashable, list[float]] = {}
    self.dropped: list[Hashable] = []

  @property
  def seen(self) -> int:
    """Distinct prompts recorded since the last `end_epoch`."""
    return len(self._history)

  def record(self, prompt_id: Hashable, rewards: Sequence[float], *,
             correct_threshold: float = 1.0) -> None:
    """Adds one group's rollout outcomes (correct = reward >= threshold)."""
    self._history.setdefault(prompt_id, []).extend(
        float(r >= correct_threshold) for r in rewards)

  def end_epoch(self) -> dict[str, Any]:
    """Drops all-correct prompts; returns counts of kept/dropped/all-wrong."""
    solved = {p for p, h in self._history.items() if h and min(h) == 1.0}
    all_wrong = sum(1 for p, h in self._history.items() if h and max(h) == 0.0)
    self.dropped.extend(p for p in self.active if p in solved)
    self.active = [p for p in self.active if p not in solved]
    self._history.clear()
    return {"kept": len(self.active), "dropped": len(solved), "all_wrong_kept": all_wrong}
