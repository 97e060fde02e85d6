"""Agentic RL's batch source: tree rollouts -> group advantages -> packed rows, for the trainer.

Batch b: every task of b gets a tree of episodes (`tree_rollout`), sampled on the rollout
engine with the weights of `kat_jax.rl.pipeline.RolloutWeights`. Batches come from a
`RolloutPipeline`: with `agentic.max_staleness` = 0 batch b is rolled out with the weights
after b updates, just before its update; with k >= 1 a rollout thread rolls out up to k
batches ahead, and weights pushed after each update reach episodes in flight (partial
rollouts; every token keeps its log-prob and weight version, and the update applies the
truncated importance weight, docs/rl.md). The rollouts record every turn and reward in the
run's `TrajectoryManager` (`kat_jax.rl.trajectories`); the batch reads its trajectories from
there, not from the episodes. Rewards become GRPO-family group advantages (a group = one
task's tree); groups are optionally pruned by entropy under a token budget; the trees are
packed depth-first into [rows, seq_len] (or, to compare, one row per trajectory:
`pack=unrolled`). A group leaves the manager once its batch is packed, so the manager holds
only groups still being rolled out. Per-step records go to `<workdir>/agentic_metrics.json`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from kat_jax.agentic.pruning import build_pruned_trees, prune_group
from kat_jax.data.packing import pad_batch_rows
from kat_jax.errors import ConfigError
from kat_jax.rl.objectives import ObjectiveConfig, group_advantages
from kat_jax.rl.pipeline import RolloutPipeline, RolloutWeights
from kat_jax.rl.trajectories import RecordedTrajectory, TrajectoryManager, oldest_version
from kat_jax.rl.tree import build_trees, pack_trees, unrolled_batch
from kat_jax.train.trainer import Work


def _record_group(episodes) -> int:
  keys = {e.record_group for e in episodes}
  if len(keys) != 1 or None in keys:
    raise ValueError(f"a rollout group's episodes carry manager groups {sorted(keys, key=str)};"
                     " run tree_rollout with the run's manager (manager=...)")
  return keys.pop()


def take_groups(manager: TrajectoryManager, episode_groups
                ) -> list[list[RecordedTrajectory]]:
  """The recorded trajectories of each rollout group (`Episode.record_group`), which the
  manager then forgets. A group's trajectories are its episodes, in branch order."""
  out = []
  for episodes in episode_groups:
    key = _record_group(episodes)
    pending = manager.pending(key)
    trajectories = manager.trajectories(key)
    if pending or len(trajectories) != len(episodes):
      raise ValueError(f"manager group {key}: {len(trajectories)} trajectories "
                       f"({len(pending)} without a reward) for {len(episodes)} episodes")
    manager.drop(key)
    out.append(trajectories)
  return out


def rl_batch(groups: list[list[RecordedTrajectory]], advantages, ag: ConfigDict,
             objective: ObjectiveConfig, pad_id: int
             ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Recorded trajectories + per-trajectory advantages -> a [B, seq_len] batch (B a multiple
  of micro_batch_rows); advantages [sum of group sizes] in the groups' order.

  Stats: token counts, and with pruning the summed `PruneReport` counts of all groups
  (kept/total tree tokens, kept/partial/total trajectories) and the mean weight mass kept.
  """
  k = 0
  trajectories, entropies = [], []
  for group in groups:
    trajectories.append([t.to_trajectory(float(advantages[k + i])) for i, t in enumerate(group)])
    entropies.append([t.entropies for t in group])
    k += len(group)
  stats: dict[str, float] = {"unrolled_tokens": float(sum(len(t.tokens) for g in trajectories
                                                            for t in g))}
  if ag.pack == "unrolled":
    batch = unrolled_batch(trajectories, objective, ag.seq_len, pad_id)
  elif ag.pack == "tree":
    if ag.prune_budget:
      try:
        pruned = [prune_group(t, e, ag.prune_budget, ag.prune_score, objective)
                  for t, e in zip(trajectories, entropies)]
      except ValueError as e:
        raise ConfigError(f"config.agentic.prune_budget / prune_score: {e}") from e
      trees = build_pruned_trees(pruned, objective)
      stats.update(_prune_stats([p.report for p in pruned]))
      empty = sum(p.report.weight_mass_kept == 0 for p in pruned)
      if empty:  # the budget fits the prompt but no policy token: those groups train nothing
        warnings.warn(f"config.agentic.prune_budget {ag.prune_budget} keeps no policy token "
                      f"of {empty} of {len(pruned)} groups (only their prompts)", stacklevel=2)
    else:
      trees = build_trees(trajectories, objective)
    stats["tree_tokens"] = float(sum(t.num_nodes for t in trees))
    batch = pack_trees(trees, ag.seq_len, pad_id)
  else:
    raise ConfigError(f"config.agentic.pack {ag.pack!r} not in ['tree', 'unrolled']")
  stats["rows"] = float(len(batch["tokens"]))
  return pad_batch_rows(batch, ag.micro_batch_rows, pad_id), stats


def _prune_stats(reports) -> dict[str, float]:
  """Sums of the groups' PruneReport counts; weight mass kept averaged over groups."""
  return {"prune_total_tokens": float(sum(r.total_tokens for r in reports)),
          "prune_kept_tokens": float(sum(r.kept_tokens for r in reports)),
          "prune_total_trajectories": float(sum(r.total_trajectories for r in reports)),
          "prune_kept_trajectories": float(sum(r.kept_trajectories for r in reports)),
          "prune_partial_trajectories": float(sum(r.partial_trajectories for r in reports)),
          "weight_mass_kept": float(np.mean([r.weight_mass_kept for r in reports]))}


class TreeRollouts:
  """The trainer's batch source for `agentic_rl`: a `RolloutPipeline` producer.

  rollout_fn(weights, tasks, key) -> (groups of episodes, sampled with the `RolloutWeights`
  (their pushes reach the rollout while it runs) and recorded in `manager`; timing stats,
  e.g. env_wait_s).
  rollout_prepare(params) -> decode params where the rollouts run (`rollout_mesh`).
  Batch b's tasks (b * tasks_per_step + i) and key follow from b, so nothing but the
  weights is checkpointed.
  """

  def __init__(self, ag: ConfigDict, objective: ObjectiveConfig, *, pad_id: int, seed: int,
               steps: int, rollout_fn: Callable, manager: TrajectoryManager, rollout_mesh: Mesh,
               rollout_prepare: Callable[[Any], Any], metrics_path: str, config_dict: dict,
               log_every: int = 1):
    self.ag, self.objective, self.pad_id, self.steps = ag, objective, pad_id, steps
    self.manager, self.rollout_fn, self.path = manager, rollout_fn, metrics_path
    self.key, self.config_dict = jax.random.key(seed + 1), config_dict
    self.log_every = log_every
    self.checkpoint = None  # the tasks and keys of a step follow from its number
    self.history: list[dict[str, Any]] = []
    if os.path.exists(metrics_path):
      with open(metrics_path, encoding="utf-8") as f:
        self.history = json.load(f)["history"]
    self.pipeline = RolloutPipeline(self._produce, RolloutWeights(rollout_prepare),
                                    max_staleness=ag.max_staleness, end=steps,
                                    mesh=rollout_mesh)
    self._last: dict[str, Any] = {}
    self._t = 0.0

  def _produce(self, index: int, weights: RolloutWeights) -> dict[str, Any]:
    """Batch `index`: its tasks' rollout trees -> rewards -> advantages -> packed host rows
    (`old_logp` = the sampled log-probs). Its groups leave the manager here."""
    start = time.perf_counter()
    tasks = [index * self.ag.tasks_per_step + i for i in range(self.ag.tasks_per_step)]
    episodes, rollout_stats = self.rollout_fn(weights, tasks, jax.random.fold_in(self.key, index))
    generated = time.perf_counter()
    groups = take_groups(self.manager, episodes)
    rewards = np.array([t.reward for g in groups for t in g])
    group_ids = np.array([i for i, g in enumerate(groups) for _ in g])
    advantages = group_advantages(rewards, group_ids, estimator=self.ag.advantage)
    batch, batch_stats = rl_batch(groups, advantages, self.ag, self.objective, self.pad_id)
    return {"batch": batch, "episodes": episodes,
            "oldest_version": oldest_version([t for g in groups for t in g], default=index),
            "stats": {"reward_mean": float(rewards.mean()),
                      "success_rate": float(np.mean(rewards >= self.ag.success_threshold)),
                      "episodes": float(len(rewards)), "generate_s": generated - start,
                      **rollout_stats, **batch_stats}}

  def next(self, state, step: int) -> Work:
    produced, waited = self.pipeline.take(step, state.params)
    out = produced.value
    batch = out["batch"]
    # No old_logp: the loss centres its clip on the weights being trained (rl.policy_step;
    # one update per batch), not on the sampler's numerics. Off-policy, the sampled log-probs
    # weight its terms (truncated importance weight).
    batch = {k: v for k, v in batch.items() if k != "old_logp"}
    if self.pipeline.k:
      batch["behav_logp"] = out["batch"]["old_logp"]
    stats = {**out["stats"], "staleness": float(step - out["oldest_version"]),
             "rollout_wait_s": waited, "produce_s": produced.seconds}
    self._last = out
    self._t = time.perf_counter()
    return Work(batch, tokens=float(np.sum(batch["kl_weight"] > 0)), stats=stats)

  def after_step(self, step: int, state, metrics: dict[str, float]) -> dict[str, float]:
    """Pushes the new weights to the rollouts (k >= 1); records the step in
    `agentic_metrics.json`."""
    timing = {"update_s": time.perf_counter() - self._t}
    timing["weight_push_s"] = self.pipeline.trained(state.params, step)
    record = {"step": step, **metrics, **timing}
    self.history = [h for h in self.history if h["step"] < step] + [record]
    if jax.process_index() == 0:
      with open(self.path, "w", encoding="utf-8") as f:
        json.dump({"config": self.config_dict, "history": self.history}, f, indent=1,
                  default=str)
      if step % self.log_every == 0 or step == self.steps:
        print(f"agentic_rl step {step}/{self.steps}: reward {record['reward_mean']:.3f} "
              f"success {record['success_rate']:.2f} loss {record.get('loss', 0.0):.4f} "
              f"staleness {record['staleness']:.0f} tokens tree "
              f"{record.get('tree_tokens', 0):.0f} / unrolled {record['unrolled_tokens']:.0f}",
              flush=True)
    return timing

  def close(self) -> None:
    self.pipeline.close()
