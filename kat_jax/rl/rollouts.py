"""Step-SRPO's rollout producer: a batch source for the trainer that samples, scores and packs.

For RL step `s` (prompt draws and sampling keys depend on (seed, s) and the prompt pool
only, so a resumed run continues as the uninterrupted one would): draw prompts (SRPO
two-stage mix, epochs without replacement, history resampling) -> sample a group per prompt
with the KV-cache sampler -> force the other mode on part of single-mode groups -> verify ->
Step-SRPO rewards and segment advantages -> optional DAPO dynamic sampling -> pack the
chosen groups with the behaviour (and reference) log-probs. The prompt pool is the
checkpointed state; the per-step curves go to `<workdir>/rl_curves.json`.
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
from kat_jax.data.chat_template import parse_autothink_response, tokenize_chat
from kat_jax.data.packing import pad_batch_rows
from kat_jax.parallel import global_batch
from kat_jax.progress import status
from kat_jax.rl import step_srpo
from kat_jax.rl.config import kind_matches
from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import ObjectiveConfig, overlong_penalty
from kat_jax.tasks.rewards import RewardPool
from kat_jax.rl.tree import Trajectory, unrolled_batch
from kat_jax.sampling import prepare_params
from kat_jax.train.trainer import Work


def select_groups(advantages: list[list[np.ndarray]], count: int, dynamic: bool) -> list[int]:
  """Indices of the groups to train on: all of them, or with DAPO dynamic sampling the
  first `count` that carry a gradient signal (`step_srpo.has_signal`)."""
  if not dynamic:
    return list(range(len(advantages)))
  return [i for i, advs in enumerate(advantages) if step_srpo.has_signal(advs)][:count]


class AutoThinkRollouts:
  """Samples AutoThink rollouts for prompt groups with the KV-cache sampler."""

  def __init__(self, model_config, tokenizer, rl: ConfigDict):
    from kat_jax.sampling import (EngineSampler,  # pylint: disable=g-import-not-at-top
                                  SamplingParams, think_mode_prompts)
    # The rollout engine: a group's samples share the prompt's pages, and a slot is refilled as
    # soon as its sample stops (think-off answers do not wait for think-on chains).
    self.sampler = EngineSampler(model_config, pad_id=tokenizer.pad_id, num_slots=64)
    self.sampling = SamplingParams(temperature=rl.temperature, vocab_limit=tokenizer.vocab_size)
    self.tokenizer, self.rl, self._force = tokenizer, rl, think_mode_prompts
    self.model_config = model_config

  def prompt_ids(self, task: task_lib.Task) -> list[int]:
    return tokenize_chat(self.tokenizer, [{"role": "user", "content": task.prompt}],
                         add_generation_prompt=True, template="kat").ids

  def _sample(self, dparams, prompts, key, num_samples):
    result = self.sampler.generate(dparams, prompts, key, max_new_tokens=self.rl.max_new_tokens,
                                   sampling=self.sampling, stop_ids=self.tokenizer.stop_ids,
                                   num_samples=num_samples)
    return result.token_lists()

  def groups(self, dparams, tasks, key, cfg: step_srpo.StepSRPOConfig):
    """Per task: list of (response ids incl. forced prefill, prefill length, forced?)."""
    key, forced_key = jax.random.split(key)
    prompts = [self.prompt_ids(t) for t in tasks]
    sampled = self._sample(dparams, prompts, key, self.rl.group_size)
    g = self.rl.group_size
    groups = [[(sampled[i * g + j], 0, False) for j in range(g)] for i in range(len(tasks))]
    # Force the other mode on part of every group that chose a single mode.
    jobs = []
    for i, group in enumerate(groups):
      modes = [self.mode(ids) for ids, _, _ in group]
      for j, mode in step_srpo.forced_rollouts(modes, cfg.force_fraction):
        jobs.append((i, j, mode))
    if jobs:
      forced_prompts = [self._force(self.tokenizer, [prompts[i]], "on" if m == "think_on"
                                    else "off")[0] for i, _, m in jobs]
      outs = self._sample(dparams, forced_prompts, forced_key, 1)
      for (i, j, _), prompt, out in zip(jobs, forced_prompts, outs):
        prefill = prompt[len(prompts[i]):]
        groups[i][j] = (prefill + out, len(prefill), True)
    return prompts, groups

  def text(self, ids) -> str:
    stops = set(self.tokenizer.stop_ids)
    return self.tokenizer.decode([t for t in ids if t not in stops])

  def mode(self, ids) -> str | None:
    return parse_autothink_response(self.text(ids), judge_prefilled=True)["mode"]


def _rate(values) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _policy_batch(prompts, groups, advantages, objective: ObjectiveConfig, pad_id: int,
                  mesh) -> dict[str, jax.Array]:
  """Global [B, T] policy batch (rows padded to the mesh) of the chosen prompt groups."""
  trajectories = []
  for prompt, group, advs in zip(prompts, groups, advantages):
    trajectories.append([
        Trajectory(prompt + ids, [0] * (len(prompt) + prefill) + [1] * (len(ids) - prefill),
                   np.concatenate([np.zeros(len(prompt)), adv]))
        for (ids, prefill, _), adv in zip(group, advs)])
  longest = max(len(t.tokens) for g in trajectories for t in g)
  batch = unrolled_batch(trajectories, objective, -(-longest // 64) * 64, pad_id)
  batch = pad_batch_rows({k: v for k, v in batch.items() if k != "visits"},
                         mesh.shape["data"] * mesh.shape["fsdp"], pad_id)
  return global_batch(batch, mesh)


def _step_stats(step: int, sampled: dict[str, list], srpo_cfg: step_srpo.StepSRPOConfig,
                mix: TwoStageMix, pool: HistoryResampler, metrics: dict[str, Any],
                resampling: dict[str, Any] | None) -> dict[str, Any]:
  """The curves' statistics of one step, over every sampled group."""
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
      "response_tokens": float(np.mean([len(ids) for g in sampled["groups"]
                                        for ids, _, _ in g])),
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
      **{k: float(v) for k, v in jax.device_get(metrics).items()},
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


def _rollout_round(rollouts: AutoThinkRollouts, dparams, tasks: list[task_lib.Task], key,
                   reward_pool: RewardPool, srpo_cfg: step_srpo.StepSRPOConfig,
                   mode_tags: list[int], rl: ConfigDict) -> dict[str, Any]:
  """Samples, verifies and scores one batch of prompt groups.

  Returns per group (lists of length len(tasks)): tasks, prompts, groups [(ids, prefill,
  forced)] x G, srpo (Rollouts), advantages ([G] per-token arrays); and results (flat
  RewardResults of all rollouts).
  """
  prompts, groups = rollouts.groups(dparams, tasks, key, srpo_cfg)
  texts = [[rollouts.text(ids) for ids, _, _ in group] for group in groups]
  parsed = [[parse_autothink_response(t, judge_prefilled=True) for t in g] for g in texts]
  results = reward_pool.score_async(
      [{"response": text, "verifier": task.verifier}
       for task, group_texts in zip(tasks, texts) for text in group_texts]).result()
  it = iter(r.reward for r in results)
  srpo = []
  for ps, group in zip(parsed, groups):
    penalties = np.zeros(len(group))
    if rl.overlong_buffer:  # DAPO soft overlong punishment on the sampled length
      penalties = overlong_penalty(np.array([len(ids) - pre for ids, pre, _ in group]),
                                   rl.max_new_tokens, rl.overlong_buffer,
                                   rl.overlong_penalty_factor)
    srpo.append([step_srpo.Rollout(p["mode"], forced, float(next(it)), p["well_formed"],
                                   float(pen))
                 for p, (_, _, forced), pen in zip(ps, group, penalties)])
  advantages, _ = step_srpo.token_advantages(
      srpo, [[ids for ids, _, _ in g] for g in groups], mode_tags, srpo_cfg)
  return {"tasks": list(tasks), "prompts": prompts, "groups": groups, "srpo": srpo,
          "advantages": advantages, "results": list(results)}


class StepSRPORollouts:
  """The trainer's batch source for `step_srpo` (see the module docstring)."""

  def __init__(self, rl: ConfigDict, *, seed: int, rollouts: AutoThinkRollouts,
               reward_pool: RewardPool, srpo_cfg: step_srpo.StepSRPOConfig,
               objective: ObjectiveConfig, task_pool: dict[str, task_lib.Task],
               mix: TwoStageMix, mode_tags: list[int], mesh, logprob_fn: Callable,
               curves_path: str):
    self.rl, self.seed, self.rollouts, self.reward_pool = rl, seed, rollouts, reward_pool
    self.srpo_cfg, self.objective, self.task_pool, self.mix = srpo_cfg, objective, task_pool, mix
    self.mode_tags, self.mesh, self.logprob_fn = mode_tags, mesh, logprob_fn
    self.curves_path = curves_path
    self.pool = HistoryResampler(list(task_pool), seed=seed)
    self.ref_params = None  # the frozen reference policy, set by the stage when beta > 0
    self.history: list[dict[str, Any]] = []
    if os.path.exists(curves_path):
      with open(curves_path, encoding="utf-8") as f:
        self.history = json.load(f)["history"]
    self.checkpoint = self  # the prompt pool travels with each checkpoint
    self._last: dict[str, Any] = {}

  # checkpointed state (Grain's handler stores non-Grain iterator states as bytes)
  def get_state(self) -> bytes:
    return json.dumps(self.pool.state_dict()).encode()

  def set_state(self, state: bytes) -> None:
    self.pool.load_state_dict(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass

  def next(self, state, step: int) -> Work:
    rl, t0 = self.rl, time.perf_counter()
    step_rng = np.random.default_rng([self.seed, step])
    dparams = prepare_params(state.params, self.rollouts.model_config, self.mesh)
    rounds = []
    for _ in range(rl.dynamic_sampling_max_batches if rl.dynamic_sampling else 1):
      tasks = _draw_tasks(self.pool, self.task_pool, self.mix, step, rl.prompts_per_step,
                          step_rng)
      rounds.append(_rollout_round(self.rollouts, dparams, tasks,
                                   jax.random.key(step_rng.integers(2**31)), self.reward_pool,
                                   self.srpo_cfg, self.mode_tags, rl))
      with_signal = sum(step_srpo.has_signal(a) for r in rounds for a in r["advantages"])
      if not rl.dynamic_sampling or with_signal >= rl.prompts_per_step:
        break
    del dparams
    sampled = {k: [x for r in rounds for x in r[k]] for k in rounds[0]}
    for task, group in zip(sampled["tasks"], sampled["srpo"]):
      self.pool.record(task.id, [r.score for r in group])
    keep = select_groups(sampled["advantages"], rl.prompts_per_step, rl.dynamic_sampling)
    batch, tokens = None, 0.0
    if keep:
      batch = _policy_batch([sampled["prompts"][i] for i in keep],
                            [sampled["groups"][i] for i in keep],
                            [sampled["advantages"][i] for i in keep],
                            self.objective, self.rollouts.tokenizer.pad_id, self.mesh)
      batch["old_logp"] = self.logprob_fn(state.params, batch)  # kept for every update
      if self.ref_params is not None:
        batch["ref_logp"] = self.logprob_fn(self.ref_params, batch)
      tokens = float(np.sum(np.asarray(batch["kl_weight"]) > 0))
    else:
      status(f"step {step + 1}: no group with a gradient signal; no update")
    resampling = None
    if self.pool.epoch_complete:  # one pass over the prompts of a kind in use
      resampling = self.pool.end_epoch(drop=rl.history_resampling)
      status(f"step {step + 1}: epoch {resampling['epoch']} done: {resampling}")
    self._last = {"sampled": sampled, "keep": keep, "resampling": resampling, "t0": t0}
    return Work(batch, tokens)

  def after_step(self, step: int, state, metrics: dict[str, float]) -> dict[str, float]:
    """Appends the step's curve point, rewrites `rl_curves.json`; returns its scalars."""
    last = self._last
    stats = _step_stats(step - 1, last["sampled"], self.srpo_cfg, self.mix, self.pool, metrics,
                        last["resampling"])
    stats.update(policy_updates=int(state.step), trained_groups=len(last["keep"]),
                 seconds=time.perf_counter() - last["t0"])
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
    self.reward_pool.close()
