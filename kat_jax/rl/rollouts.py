"""Step-SRPO's rollout producer: a batch source for the trainer that samples, scores and packs.

Batch `b` (prompt draws and sampling keys depend on (seed, b) and the prompt pool only, so a
resumed run draws what the uninterrupted one would): draw prompts (SRPO two-stage mix, epochs
without replacement, history resampling) -> sample, force and score the groups
(`autothink_groups.rollout_round`; rewards streamed while the round generates) -> Step-SRPO
rewards and segment advantages -> optional DAPO dynamic sampling -> record every sample in a
`TrajectoryManager` -> pack the chosen groups (a prefix tree per group, or a row per sample).

Batches come from `pipeline.RolloutPipeline`: with `rl.max_staleness` = 0 each is produced
with the trainer's current weights, just before its update; with k >= 1 a rollout thread
produces up to k batches ahead (partial rollouts, per-token weight versions). The trainer's
side centres the update on its current weights (the proximal policy: taken in the update's
own forward pass, or by a separate `old_logp` pass when a batch gets several updates); an
off-policy batch also carries the sampled log-probs (`behav_logp`) for the importance
weight. The prompt pool, as of the last trained batch, is the checkpointed state; the
per-step curves go to `<workdir>/rl_curves.json`.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from kat_jax.tasks import dual_regime as task_lib
from kat_jax.data.packing import pad_batch_rows
from kat_jax.parallel import global_batch
from kat_jax.progress import status
from kat_jax.rl import step_srpo
from kat_jax.rl.config import kind_matches
from kat_jax.rl.autothink_groups import AutoThinkRollouts, rollout_round
from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.pipeline import RolloutPipeline, RolloutWeights
from kat_jax.tasks.rewards import RewardPool
from kat_jax.rl.trajectories import TrajectoryManager, oldest_version
from kat_jax.rl.tree import build_trees, pack_trees, unrolled_batch
from kat_jax.train.trainer import Work


def select_groups(advantages: list[list[np.ndarray]], count: int, dynamic: bool) -> list[int]:
  """Indices of the groups to train on: all of them, or with DAPO dynamic sampling the
  first `count` that carry a gradient signal (`step_srpo.has_signal`)."""
  if not dynamic:
    return list(range(len(advantages)))
  return [i for i, advs in enumerate(advantages) if step_srpo.has_signal(advs)][:count]


def _rate(values) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _record_groups(manager: TrajectoryManager, prompts, groups, results) -> list[int]:
  """Records every sample of the sampled groups (in sample order) with its reward; returns
  the groups' keys. A forced sample's prefill is part of its context (mask 0)."""
  keys, rewards = [], iter(results)
  for prompt, group in zip(prompts, groups):
    key = manager.new_group()
    for x in group:
      iid = manager.record(key, prompt + x.ids[:x.prefill], x.ids[x.prefill:], x.logprobs,
                           x.versions)
      manager.set_reward(iid, next(rewards).reward)
    keys.append(key)
  return keys


def _policy_rows(manager: TrajectoryManager, keys: list[int], advantages,
                 objective: ObjectiveConfig, pad_id: int, rows_multiple: int, pack: str
                 ) -> dict[str, np.ndarray]:
  """This process's [B, T] policy rows of the chosen groups, from the trajectory manager
  (rows padded to a multiple of the mesh's batch axes); `old_logp` holds the behaviour
  log-probs. advantages: per group, per sample, [response] per-token arrays.

  pack "tree": a group's samples are one prefix tree (the prompt once), trees packed
  first fit, largest first, into rows as long as the largest; "unrolled": one row per sample.
  """
  trajectories = []
  for key, advs in zip(keys, advantages):
    recorded = manager.trajectories(key)
    trajectories.append([t.to_trajectory(np.concatenate([np.zeros(len(t.tokens) - len(a)), a]))
                         for t, a in zip(recorded, advs)])
  if pack == "tree":
    trees = build_trees(trajectories, objective)
    batch = pack_trees(trees, -(-max(t.num_nodes for t in trees) // 64) * 64, pad_id)
  else:
    longest = max(len(t.tokens) for g in trajectories for t in g)
    batch = unrolled_batch(trajectories, objective, -(-longest // 64) * 64, pad_id)
  return pad_batch_rows({k: v for k, v in batch.items() if k != "visits"}, rows_multiple,
                        pad_id)


def _batch_stats(step: int, sampled: dict[str, list], srpo_cfg: step_srpo.StepSRPOConfig,
                 mix: TwoStageMix, pool: HistoryResampler,
                 resampling: dict[str, Any] | None) -> dict[str, Any]:
  """The curves' statistics of one batch, over every sampled group (the pool as it is right
  after the batch was produced)."""
  rewards = [step_srpo.group_rewards(g, srpo_cfg) for g in sampled["srpo"]]
  reward_stats = {"judge_reward": float(np.mean(np.concatenate([j for j, _, _ in rewards]))),
                  "answer_reward": float(np.mean(np.concatenate([a for _, a, _ in rewards])))}
  flat = [(task, r) for task, group in zip(sampled["tasks"], sampled["srpo"]) for r in group]
  free = [(task, r) for task, r in flat if not r.forced]
  statuses = collections.Counter(r.status for r in sampled["results"])
  stats = {
      "step": step + 1,
      "accuracy": float(np.mean([r.score for _, r in flat])),
      "format_rate": float(np.mean([r.well_formed for _, r in flat])),
      "think_on_rate_easy": _rate([r.mode == "think_on" for t, r in free
                                   if t.regime == "easy"]),
      "think_on_rate_hard": _rate([r.mode == "think_on" for t, r in free
                                   if t.regime == "hard"]),
      "response_tokens": float(np.mean([len(x.ids) for g in sampled["groups"] for x in g])),
      "forced": int(sum(r.forced for _, r in flat)),
      "overlong_penalty": float(np.mean([r.length_penalty for _, r in flat])),
      "reward_timeouts": float(statuses["timeout"]),
      "reward_errors": float(statuses["error"]),
      # code verdicts from a sandbox that could not isolate the program (forgeable rewards)
      "code_untrusted": float(sum(r.kind == "code" and not r.trusted
                                  for r in sampled["results"])),
      "sampled_groups": len(sampled["tasks"]),
      "mix_stage": mix.stage(step),
      "domains": dict(collections.Counter(t.domain for t in sampled["tasks"])),
      "prompt_ids": [t.id for t in sampled["tasks"]],
      "active_prompts": len(pool.active),
      "epoch": pool.epoch,
      "resampling": resampling,
      **reward_stats,
  }
  stats["reward"] = (reward_stats["answer_reward"]
                     + srpo_cfg.judge_weight * reward_stats["judge_reward"])
  return stats


def _draw_tasks(pool: HistoryResampler, task_pool: dict[str, task_lib.Task], mix: TwoStageMix,
                step: int, count: int, rng: np.random.Generator) -> list[task_lib.Task]:
  """`count` prompts: kinds by the step's mix (kinds without active prompts left out), each
  prompt the next undrawn one of its kind in the resampler's epoch order."""
  available = lambda kind: any(kind_matches(kind, task_pool[i]) for i in pool.active)  # noqa: E731
  try:
    kinds = mix.sample_domains(step, count, rng, available)
  except ValueError:  # every kind of the mix was dropped: draw from all active prompts
    kinds = [None] * count
  chosen = []
  for kind in kinds:
    accept = ((lambda i: True) if kind is None  # noqa: E731
              else (lambda i, k=kind: kind_matches(k, task_pool[i])))
    chosen.append(task_pool[pool.draw(accept, rng)])
  return chosen


class StepSRPORollouts:
  """The trainer's batch source for `step_srpo` (see the module docstring).

  rollout_prepare(params) -> decode params where the rollouts run (`rollout_mesh`, the
  context and default device of the producer).
  """

  def __init__(self, rl: ConfigDict, *, seed: int, rollouts: AutoThinkRollouts,
               reward_pool: RewardPool, srpo_cfg: step_srpo.StepSRPOConfig,
               objective: ObjectiveConfig, task_pool: dict[str, task_lib.Task],
               mix: TwoStageMix, mode_tags: list[int], mesh, logprob_fn: Callable,
               curves_path: str, rollout_prepare: Callable[[Any], Any], rollout_mesh=None):
    self.rl, self.seed, self.rollouts, self.reward_pool = rl, seed, rollouts, reward_pool
    self.srpo_cfg, self.objective, self.task_pool, self.mix = srpo_cfg, objective, task_pool, mix
    self.mode_tags, self.mesh, self.logprob_fn = mode_tags, mesh, logprob_fn
    self.curves_path = curves_path
    self.pool = HistoryResampler(list(task_pool), seed=seed)
    self._pool_state = self.get_pool_state()  # the pool after the last trained batch
    self.ref_params = None  # the frozen reference policy, set by the stage when beta > 0
    self.history: list[dict[str, Any]] = []
    if os.path.exists(curves_path):
      with open(curves_path, encoding="utf-8") as f:
        self.history = json.load(f)["history"]
    self.checkpoint = self  # the prompt pool travels with each checkpoint
    weights = RolloutWeights(rollout_prepare)
    weights.attach(rollouts.sampler)
    self.pipeline = RolloutPipeline(self._produce, weights, max_staleness=rl.max_staleness,
                                    end=rl.steps, mesh=rollout_mesh)
    self._last: dict[str, Any] = {}

  def get_pool_state(self) -> bytes:
    return json.dumps(self.pool.state_dict()).encode()

  # checkpointed state (Grain's handler stores non-Grain iterator states as bytes)
  def get_state(self) -> bytes:
    return self._pool_state

  def set_state(self, state: bytes) -> None:
    self.pool.load_state_dict(json.loads(state.decode()))
    self._pool_state = state

  def start_prefetch(self) -> None:
    pass

  def _produce(self, index: int, weights: RolloutWeights) -> dict[str, Any]:
    """Batch `index`: rounds of sampled, scored groups; the chosen ones packed (host rows)."""
    rl = self.rl
    step_rng = np.random.default_rng([self.seed, index])
    rounds = []
    for _ in range(rl.dynamic_sampling_max_batches if rl.dynamic_sampling else 1):
      tasks = _draw_tasks(self.pool, self.task_pool, self.mix, index, rl.prompts_per_step,
                          step_rng)
      rounds.append(rollout_round(self.rollouts, weights, tasks,
                                   jax.random.key(step_rng.integers(2**31)), self.reward_pool,
                                   self.srpo_cfg, self.mode_tags, rl))
      with_signal = sum(step_srpo.has_signal(a) for r in rounds for a in r["advantages"])
      if not rl.dynamic_sampling or with_signal >= rl.prompts_per_step:
        break
    sampled = {k: [x for r in rounds for x in r[k]] for k in
               ("tasks", "prompts", "groups", "srpo", "advantages", "results")}
    for task, group in zip(sampled["tasks"], sampled["srpo"]):
      self.pool.record(task.id, [r.score for r in group])
    keep = select_groups(sampled["advantages"], rl.prompts_per_step, rl.dynamic_sampling)
    manager = TrajectoryManager()  # this batch's interactions; the update reads them from it
    keys = _record_groups(manager, sampled["prompts"], sampled["groups"], sampled["results"])
    rows = None
    if keep:
      rows = _policy_rows(manager, [keys[i] for i in keep],
                          [sampled["advantages"][i] for i in keep], self.objective,
                          self.rollouts.tokenizer.pad_id,
                          self.mesh.shape["data"] * self.mesh.shape["fsdp"], rl.pack)
    resampling = None
    if self.pool.epoch_complete:  # one pass over the prompts of a kind in use
      resampling = self.pool.end_epoch(drop=rl.history_resampling)
      status(f"step {index + 1}: epoch {resampling['epoch']} done: {resampling}")
    return {"rows": rows, "keep": keep, "sampled": sampled, "pool_state": self.get_pool_state(),
            "stats": _batch_stats(index, sampled, self.srpo_cfg, self.mix, self.pool,
                                  resampling),
            "oldest_version": oldest_version(
                [t for key in keys for t in manager.trajectories(key)], default=index),
            "timing": {"generate_s": sum(r["generate_s"] for r in rounds),
                       "reward_wait_s": sum(r["reward_wait_s"] for r in rounds)}}

  def next(self, state, step: int) -> Work:
    t0 = time.perf_counter()
    produced, waited = self.pipeline.take(step, state.params)
    out = produced.value
    timing = {**out["timing"], "rollout_wait_s": waited, "produce_s": produced.seconds}
    batch, tokens = None, 0.0
    if out["keep"]:
      batch = global_batch(out["rows"], self.mesh)
      behaviour = batch.pop("old_logp")
      t1 = time.perf_counter()
      # The proximal policy: the weights this update starts from (= the sampling weights
      # on-policy). One update per batch takes it from the update's own forward pass
      # (rl.policy_step: no old_logp); several need it fixed, from a pass of its own.
      # Off-policy, the sampled log-probs weight the terms (objectives module).
      if self.rl.updates_per_batch > 1:
        batch["old_logp"] = self.logprob_fn(state.params, batch)
      if self.pipeline.k:
        batch["behav_logp"] = behaviour
      if self.ref_params is not None:
        batch["ref_logp"] = self.logprob_fn(self.ref_params, batch)
      jax.block_until_ready(batch)
      timing["logprob_s"] = time.perf_counter() - t1
      tokens = float(np.sum(np.asarray(out["rows"]["kl_weight"]) > 0))
    else:
      status(f"step {step + 1}: no group with a gradient signal; no update")
    self._last = {**out, "timing": timing, "staleness": step - out["oldest_version"],
                  "t_update": time.perf_counter(), "t0": t0}
    return Work(batch, tokens)

  def after_step(self, step: int, state, metrics: dict[str, float]) -> dict[str, float]:
    """Pushes the new weights to the rollouts (k >= 1); appends the step's curve point,
    rewrites `rl_curves.json`; returns its scalars."""
    last = self._last
    timing = {**last["timing"], "update_s": time.perf_counter() - last["t_update"]}
    timing["weight_push_s"] = self.pipeline.trained(state.params, step)
    self._pool_state = last["pool_state"]
    stats = {**last["stats"], **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    stats.update(policy_updates=int(state.step), trained_groups=len(last["keep"]),
                 seconds=time.perf_counter() - last["t0"],
                 staleness=float(last["staleness"]), **timing)
    if stats["reward_timeouts"] or stats["reward_errors"]:
      bad = [r for r in last["sampled"]["results"] if r.status in ("timeout", "error")]
      status(f"step {step}: rewards: {stats['reward_timeouts']:.0f} timeouts, "
             f"{stats['reward_errors']:.0f} errors (e.g. {bad[0].kind} "
             f"{bad[0].status}: {bad[0].detail})")
    self.history = [h for h in self.history if h["step"] < step] + [stats]
    if jax.process_index() == 0:
      with open(self.curves_path, "w", encoding="utf-8") as f:
        json.dump({"history": self.history}, f, indent=1)
    return {k: v for k, v in stats.items() if isinstance(v, float) and k != "step"}

  def close(self) -> None:
    self.pipeline.close()
    self.reward_pool.close()
