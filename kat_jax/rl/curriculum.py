"""SRPO's data schedule (Kwaipilot, arXiv 2504.14286): two-stage cross-domain training and
history resampling.

- `TwoStageMix`: stage 1 samples prompts from one domain mix (SRPO: hard math only, to grow
  long reasoning), stage 2 from another (math + code) after `switch_step`.
- `HistoryResampler`: prompts are drawn without replacement through a shuffled order per
  epoch; after each epoch, prompts whose rollouts were *all* correct are dropped (no
  advantage variance, no gradient); mixed and all-wrong prompts stay — unlike DAPO's
  dynamic sampling, which also drops all-wrong groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class TwoStageMix:
  """Sampling weights over prompt kinds (any names: domains, regimes) before/after a step."""

  stage1: Mapping[str, float]  # kind -> sampling weight
  stage2: Mapping[str, float]
  switch_step: int

  def stage(self, step: int) -> int:
    return 1 if step < self.switch_step else 2

  def weights(self, step: int) -> Mapping[str, float]:
    return self.stage1 if step < self.switch_step else self.stage2

  def sample_domains(self, step: int, count: int, rng: np.random.Generator,
                     available: Callable[[str], bool] | None = None) -> list[str]:
    """`count` kinds drawn by weight; kinds with `available(kind)` False are left out and
    the remaining weights renormalised. ValueError if no positive weight is left."""
    mix = {d: w for d, w in self.weights(step).items()
           if w > 0 and (available is None or available(d))}
    if not mix:
      raise ValueError(f"the data mix at step {step} has no positive weight left")
    domains = sorted(mix)
    p = np.array([mix[d] for d in domains], np.float64)
    return list(rng.choice(domains, size=count, p=p / p.sum()))


class HistoryResampler:
  """The prompt pool, its epochs and SRPO's history resampling.

  An epoch is one pass without replacement over a shuffled order of the active prompts
  (seeded by (seed, epoch)): `draw(accept)` hands out the next prompt of the order not yet
  drawn this epoch that `accept` admits. When none is left for a request, the epoch is
  complete (`epoch_complete`; that draw falls back to a random admitted prompt) and the
  caller ends it with `end_epoch` once the rewards of its last batch are recorded. With a
  data mix, the epoch thus ends when the first kind in use runs out.
  """

  def __init__(self, prompt_ids: Sequence[Hashable], seed: int = 0):
    self.active = list(prompt_ids)
    self.dropped: list[Hashable] = []
    self.seed = seed
    self.epoch = 0
    self.epoch_complete = False
    self._history: dict[Hashable, list[float]] = {}
    self._drawn: set[Hashable] = set()
    self._order = self._shuffled()

  def _shuffled(self) -> list[Hashable]:
    perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.active))
    return [self.active[i] for i in perm]

  @property
  def seen(self) -> int:
    """Distinct prompts recorded since the last `end_epoch`."""
    return len(self._history)

  def draw(self, accept: Callable[[Hashable], bool], rng: np.random.Generator
           ) -> Hashable | None:
    """Next undrawn admitted prompt of this epoch; None if no active prompt is admitted."""
    for prompt in self._order:
      if prompt not in self._drawn and accept(prompt):
        self._drawn.add(prompt)
        return prompt
    candidates = [p for p in self.active if accept(p)]
    if not candidates:
      return None
    self.epoch_complete = True  # this kind is used up: the epoch ends after this batch
    return candidates[rng.integers(len(candidates))]

  def record(self, prompt_id: Hashable, rewards: Sequence[float], *,
             correct_threshold: float = 1.0) -> None:
    """Adds one group's rollout outcomes (correct = reward >= threshold)."""
    self._history.setdefault(prompt_id, []).extend(
        float(r >= correct_threshold) for r in rewards)

  def end_epoch(self, drop: bool = True) -> dict[str, Any]:
    """Drops (if `drop`) the prompts all of whose recorded rollouts were correct (unless that
    is every active prompt), then starts the next epoch. Returns counts of kept/dropped
    prompts and all-wrong prompts kept."""
    solved = {p for p, h in self._history.items() if h and min(h) == 1.0} if drop else set()
    if self.active and solved >= set(self.active):
      solved = set()  # every prompt solved: keep the pool rather than leave nothing to draw
    all_wrong = sum(1 for p, h in self._history.items() if h and max(h) == 0.0)
    dropped = [p for p in self.active if p in solved]
    self.dropped.extend(dropped)
    self.active = [p for p in self.active if p not in solved]
    summary = {"epoch": self.epoch, "kept": len(self.active), "dropped": len(dropped),
               "all_wrong_kept": all_wrong}
    self._history.clear()
    self._drawn.clear()
    self.epoch += 1
    self.epoch_complete = False
    self._order = self._shuffled()
    return summary

  def state_dict(self) -> dict[str, Any]:
    """JSON-able state (prompt ids must be JSON-able), for run checkpoints."""
    return {"seed": self.seed, "epoch": self.epoch, "epoch_complete": self.epoch_complete,
            "active": list(self.active), "dropped": list(self.dropped),
            "history": [[p, h] for p, h in self._history.items()],
            "drawn": [p for p in self._order if p in self._drawn]}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()`; the epoch's order is re-derived from (seed, epoch, active)."""
    try:
      self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
      self.epoch_complete = bool(state["epoch_complete"])
      self.active, self.dropped = list(state["active"]), list(state["dropped"])
      self._history = {p: [float(x) for x in h] for p, h in state["history"]}
      self._drawn = set(state["drawn"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"bad HistoryResampler state: {type(e).__name__}: {e}") from e
    self._order = self._shuffled()
