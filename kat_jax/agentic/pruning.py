"""Entropy-based pruning of a group's prefix tree under a token budget.

KAT-Dev / KAT-Coder (KAT-Coder blog, "Entropy-Based Tree Pruning"): trajectories are compressed
into a prefix tree whose edges are token segments; under a fixed budget the trainer "estimates
node informativeness based on entropy signals and reach probability, expanding nodes in order
of importance until the budget is exhausted". The write-up gives no formula, so ours is:

- the tree is the *compressed* trie of one group: a node is a maximal token segment between
  branch points (every trajectory through it shares all of its tokens);
- expansion is best-first from the root: a frontier of segments whose parent is kept, popped
  by score; a popped segment is kept if its tokens fit the remaining budget (its children then
  join the frontier), else skipped. A budget below the root segment (the prompt) is an error:
  nothing could be kept. The kept set is therefore ancestor-closed: a valid
  (smaller) prefix tree whose loss is the full loss restricted to the kept tokens;
- default score (`entropy_reach_score`) = reach probability x mean policy entropy of the
  segment. Reach probability is the *visit fraction* visits / group size: the Monte Carlo
  estimate, under the behaviour policy, of reaching the segment. We prefer it to the product
  of exp(old_logp) along the path, which shrinks geometrically with length and so ranks short
  branches first whatever their entropy; that variant is `logp_reach_score` (probability of
  the segment given its parent, i.e. exp of the sum of its old log-probs). Any
  `score_fn(Segment) -> float` can be passed.

Pruned trajectories keep their *unpruned* aggregation weights (`build_pruned_trees`), so the
kept loss terms are exactly those of the full loss; `PruneReport.weight_mass_kept` says how
much of the loss weight survives.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, Sequence

import numpy as np

from kat_jax.rl.radix import shared_prefix
from kat_jax.rl.tree import PrefixTree, Trajectory
from kat_jax.rl.objectives import ObjectiveConfig, trajectory_weights


@dataclasses.dataclass
class Segment:
  """A node of the compressed trie: tokens [start, end) of every trajectory in `members`.

  entropy / old_logp / loss_mask: [end - start] of the segment's tokens. Members share the
  context, hence the entropy and log-prob; loss_mask is 1 where any member trains the token,
  and the values come from such a member (see `_shared_values`). visits = len(members).
  """

  start: int
  end: int
  members: list[int]
  entropy: np.ndarray
  old_logp: np.ndarray
  loss_mask: np.ndarray
  group_size: int
  parent: int = -1
  children: list[int] = dataclasses.field(default_factory=list)

  @property
  def num_tokens(self) -> int:
    return self.end - self.start

  @property
  def visits(self) -> int:
    return len(self.members)


ScoreFn = Callable[[Segment], float]


def _mean_policy_entropy(segment: Segment) -> float | None:
  mask = segment.loss_mask > 0
  return float(segment.entropy[mask].mean()) if mask.any() else None


def entropy_reach_score(segment: Segment) -> float | None:
  """visits / group size x mean entropy of the segment's policy tokens (None: no policy token)."""
  entropy = _mean_policy_entropy(segment)
  return None if entropy is None else segment.visits / segment.group_size * entropy


def logp_reach_score(segment: Segment) -> float | None:
  """exp(Σ old_logp of the segment's policy tokens) x their mean entropy."""
  entropy = _mean_policy_entropy(segment)
  if entropy is None:
    return None
  mask = segment.loss_mask > 0
  return float(np.exp(segment.old_logp[mask].sum())) * entropy


SCORE_FNS: dict[str, ScoreFn] = {"entropy_reach": entropy_reach_score,
                                 "logp_reach": logp_reach_score}


@dataclasses.dataclass
class PruneReport:
  """What a pruning kept. Tokens count tree nodes (shared tokens once)."""

  budget: int
  total_tokens: int
  kept_tokens: int
  total_trajectories: int
  kept_trajectories: int  # kept whole
  partial_trajectories: int  # a non-empty proper prefix kept
  weight_mass_total: float
  weight_mass_kept: float  # Σ loss weight (w_k per policy token) on kept tokens / total

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class PrunedGroup:
  """keep_lengths[k]: how many leading tokens of trajectories[k] are kept (0 = dropped)."""

  trajectories: list[Trajectory]
  keep_lengths: np.ndarray
  report: PruneReport

  def kept(self) -> list[Trajectory]:
    """The kept prefixes as trajectories (dropped ones left out)."""
    return [truncate(t, n) for t, n in zip(self.trajectories, self.keep_lengths) if n > 0]


def truncate(trajectory: Trajectory, length: int) -> Trajectory:
  """The first `length` tokens of a trajectory (per-token advantages cut alike)."""
  return Trajectory(trajectory.tokens[:length], trajectory.loss_mask[:length],
                    trajectory.advantage[:length], trajectory.old_logp[:length],
                    trajectory.ref_logp[:length])


def _shared_values(members: Sequence[Trajectory], entropies: Sequence[np.ndarray], start: int,
                   end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(entropy, old_logp, loss_mask) [end - start] of tokens shared by `members`.

  A token is a policy token if any member trains it (a prefilled token in one trajectory
  may be sampled in another); its entropy and log-prob come from a member that trains it.
  """
  masks = np.stack([t.loss_mask[start:end] for t in members])  # [M, n]
  source = np.argmax(masks > 0, axis=0)  # first training member per token (0 if none)
  cols = np.arange(end - start)
  entropy = np.stack([np.asarray(e[start:end], np.float64) for e in entropies])[source, cols]
  old_logp = np.stack([t.old_logp[start:end] for t in members]).astype(np.float64)[source, cols]
  return entropy, old_logp, masks.max(axis=0)


def _shared_run_end(seqs: list[np.ndarray], start: int) -> int:
  """One past the last position of the run from `start` where every sequence has a token and
  all tokens agree (they agree at `start`)."""
  first = seqs[0]
  end = min(len(s) for s in seqs)
  for s in seqs[1:]:
    end = start + shared_prefix(s[start:end], first[start:end])
  return end


def compressed_trie(trajectories: Sequence[Trajectory], entropies: Sequence[np.ndarray]
                    ) -> list[Segment]:
  """Segments of the group's compressed trie; index 0.. in creation order, parents first.

  Roots (one per distinct first token) have parent -1.
  """
  if len(trajectories) != len(entropies):
    raise ValueError(f"got {len(entropies)} entropy arrays for {len(trajectories)} trajectories")
  for k, (t, e) in enumerate(zip(trajectories, entropies)):
    if np.shape(e) != t.tokens.shape:
      raise ValueError(f"entropies[{k}] has shape {np.shape(e)}, tokens {t.tokens.shape}")
  segments: list[Segment] = []
  n = len(trajectories)

  def split(members: list[int], start: int, parent: int) -> None:
    # Group members by their token at `start`; each group is one child segment.
    by_token: dict[int, list[int]] = {}
    for k in members:
      if start < len(trajectories[k].tokens):
        by_token.setdefault(int(trajectories[k].tokens[start]), []).append(k)
    for group in by_token.values():
      end = _shared_run_end([trajectories[k].tokens for k in group], start)
      index = len(segments)
      segments.append(Segment(start, end, group, *_shared_values(
          [trajectories[k] for k in group], [entropies[k] for k in group], start, end),
                              n, parent))
      if parent >= 0:
        segments[parent].children.append(index)
      split(group, end, index)

  split(list(range(n)), 0, -1)
  return segments


def prune_group(trajectories: Sequence[Trajectory], entropies: Sequence[np.ndarray],
                budget: int, score_fn: ScoreFn | str = "entropy_reach",
                cfg: ObjectiveConfig | None = None) -> PrunedGroup:
  """Best-first expansion of the group's prefix tree until `budget` tree tokens are used.

  Args:
    trajectories: one group (one task's rollouts), tokens sharing prefixes.
    entropies: per trajectory [L] policy entropy of each token (0 on non-policy tokens).
    budget: most tree tokens (shared tokens counted once) to keep.
    score_fn: Segment -> importance (None = no policy tokens: inherit the parent's score),
      or a name in SCORE_FNS.
    cfg: aggregation mode for the loss-weight mass in the report (default GRPO's).

  Returns:
    A PrunedGroup with per-trajectory kept lengths and the report.

  Raises:
    ValueError: if the budget is smaller than every root segment (the prompt), since the
      kept tree would be empty. We raise rather than keep the root over budget: the budget
      bounds the packed row length, and an over-budget tree could no longer fit `seq_len`.
  """
  if budget < 1:
    raise ValueError(f"budget must be >= 1 token, got {budget}")
  if isinstance(score_fn, str):
    if score_fn not in SCORE_FNS:
      raise ValueError(f"unknown score_fn {score_fn!r}; valid: {sorted(SCORE_FNS)}")
    score_fn = SCORE_FNS[score_fn]
  segments = compressed_trie(trajectories, entropies)
  scores: list[float] = []
  for seg in segments:  # parents come before children
    s = score_fn(seg)
    scores.append(float(s) if s is not None else
                  (scores[seg.parent] if seg.parent >= 0 else float("inf")))
  kept = np.zeros(len(segments), bool)
  used = 0
  # heapq is a min-heap: push -score; the index breaks ties in creation (depth-first) order.
  frontier = [(-scores[i], i) for i, seg in enumerate(segments) if seg.parent < 0]
  heapq.heapify(frontier)
  while frontier:
    _, i = heapq.heappop(frontier)
    if used + segments[i].num_tokens > budget:
      continue
    kept[i] = True
    used += segments[i].num_tokens
    for c in segments[i].children:
      heapq.heappush(frontier, (-scores[c], c))
  if segments and not used:  # no root fits: an empty tree would train on nothing, silently
    root = min(seg.num_tokens for seg in segments if seg.parent < 0)
    raise ValueError(f"prune budget {budget} is smaller than the group's root segment "
                     f"({root} tokens: the shared prompt), so nothing would be kept; the "
                     "budget must cover the prompt plus the branches to train on")

  keep_lengths = np.zeros(len(trajectories), np.int64)
  for i, seg in enumerate(segments):
    if kept[i]:
      for k in seg.members:
        keep_lengths[k] = max(keep_lengths[k], seg.end)
  full = np.array([len(t.tokens) for t in trajectories])
  weights = trajectory_weights(np.array([t.loss_mask.sum() for t in trajectories]),
                               cfg or ObjectiveConfig())
  mass_total = float(sum(w * t.loss_mask.sum() for w, t in zip(weights, trajectories)))
  mass_kept = float(sum(w * t.loss_mask[:n].sum()
                        for w, t, n in zip(weights, trajectories, keep_lengths)))
  report = PruneReport(
      budget=int(budget), total_tokens=int(sum(s.num_tokens for s in segments)),
      kept_tokens=int(used), total_trajectories=len(trajectories),
      kept_trajectories=int(np.sum(keep_lengths == full)),
      partial_trajectories=int(np.sum((keep_lengths > 0) & (keep_lengths < full))),
      weight_mass_total=mass_total,
      weight_mass_kept=mass_kept / mass_total if mass_total > 0 else 1.0)
  return PrunedGroup(list(trajectories), keep_lengths, report)


def build_pruned_trees(pruned: Sequence[PrunedGroup], cfg: ObjectiveConfig
                       ) -> list[PrefixTree]:
  """Prefix trees of the kept prefixes, weighted by the *unpruned* trajectory lengths.

  So every kept token carries exactly the loss weight it has in the full tree.
  """
  flat = [t for group in pruned for t in group.trajectories]
  weights = trajectory_weights(np.array([t.loss_mask.sum() for t in flat]), cfg)
  trees, k = [], 0
  for group in pruned:
    tree = PrefixTree()
    for trajectory, n in zip(group.trajectories, group.keep_lengths):
      if n > 0:
        tree.add(truncate(trajectory, int(n)), float(weights[k]))
      k += 1
    trees.append(tree)
  return trees
