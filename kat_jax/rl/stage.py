"""Stage `step_srpo`: AutoThink RL on the generated dual-regime tasks.

Each step: draw prompts (SRPO two-stage data mix, epochs without replacement, history
resampling) → sample a group of rollouts per prompt with the KV-cache sampler (the model
judges and picks its mode) → force the other mode on part of any single-mode group → verify
answers → Step-SRPO rewards (+ optional DAPO overlong shaping) and segment advantages →
optional DAPO dynamic sampling (drop groups without signal, refill) → old (and frozen
reference) log-probs → `updates_per_batch` clipped policy updates.
Curves (reward, think-on rate on easy/hard prompts, response length) go to
`<workdir>/rl_curves.json` and `.png`.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from kat_jax.agentic.tree import Trajectory, unrolled_batch
from kat_jax.autothink import tasks as task_lib
from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.data.packing import pad_batch_rows
from kat_jax.data.chat_template import parse_autothink_response, tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.parallel import (batch_sharding, global_batch, make_mesh,
                              replicated, sharding_context)
from kat_jax.rl import step_srpo
from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import ObjectiveConfig, overlong_penalty
from kat_jax.rl.policy_step import make_logprob_fn, make_policy_step
from kat_jax.rl.rewards import RewardPool
from kat_jax.train.metrics import MetricsLogger
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import init_sharded_state


def rl_fields() -> ConfigDict:
  """`config.rl` with its defaults."""
  return ConfigDict(dict(
      init_sft_workdir="",  # start from the last checkpoint of an `sft` run's workdir
      steps=30,
      prompts_per_step=16,
      group_size=8,
      max_new_tokens=160,
      temperature=1.0,
      updates_per_batch=1,  # policy updates on each rollout batch (old log-probs kept)
      num_tasks=2000,
      task_seed=4321,
      hard_fraction=0.5,
      eval_prompts=100,  # held-out prompts for the final greedy evaluation
      code_time_limit=2.0,  # sandbox wall clock of one code run (s)
      reward_workers=2,
      # SRPO data schedule: mixes before/after switch_step, "kind:weight,..." where a kind
      # is a regime (easy, hard), a domain (general, math, code, science) or "domain/regime"
      # (e.g. stage1_mix="math:1", stage2_mix="math:0.5,code:0.5" as SRPO).
      stage1_mix="easy:0.5,hard:0.5",
      stage2_mix="easy:0.5,hard:0.5",
      switch_step=0,
      history_resampling=True,  # after each epoch drop prompts whose rollouts were all right
      # DAPO (arXiv 2503.14476), both off by default:
      dynamic_sampling=False,  # train only on groups with a gradient signal, refilled by
      dynamic_sampling_max_batches=3,  # sampling up to this many prompt batches per step
      overlong_buffer=0,  # soft overlong punishment over the last N of max_new_tokens; 0 off
      overlong_penalty_factor=1.0,
      objective=ConfigDict(dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, beta=0.0,
                                kl_estimator="k3", entropy_coef=0.0,
                                loss_agg_mode="seq-mean-token-mean")),
      step_srpo=ConfigDict(dict(margin=0.0, wrong_mode_scale=0.5, format_penalty=1.0,
                                judge_weight=0.5, intermediate_supervision=True,
                                force_fraction=0.25, advantage_estimator="grpo")),
  ))


def _kind_matches(kind: str, task: task_lib.Task) -> bool:
  """Does a mix kind ("easy", "math" or "math/hard") select this task?"""
  domain, _, regime = kind.partition("/")
  if regime:
    return task.domain == domain and task.regime == regime
  return task.regime == kind if kind in task_lib.REGIMES else task.domain == kind


def _known_kind(kind: str) -> bool:
  domain, sep, regime = kind.partition("/")
  if sep:
    return domain in task_lib.DOMAINS and regime in task_lib.REGIMES
  return kind in task_lib.REGIMES or kind in task_lib.DOMAINS


def _parse_mix(text: str, field: str, tasks: list[task_lib.Task] | None = None
               ) -> dict[str, float]:
  """"kind:weight,..." -> {kind: weight}; every kind must select some of `tasks`."""
  try:
    mix = {k.strip(): float(v) for k, v in (item.split(":") for item in text.split(","))}
  except ValueError as e:
    raise ConfigError(f"config.rl.{field} {text!r} is not 'kind:weight,...'") from e
  unknown = [k for k in mix if not _known_kind(k)]
  if unknown:
    raise ConfigError(f"config.rl.{field}: unknown kinds {sorted(unknown)}; known regimes "
                      f"{list(task_lib.REGIMES)}, domains {list(task_lib.DOMAINS)} or "
                      f"'domain/regime'")
  if any(w < 0 for w in mix.values()) or not any(w > 0 for w in mix.values()):
    raise ConfigError(f"config.rl.{field} {text!r}: weights must be >= 0, one > 0")
  empty = [k for k, w in mix.items() if w > 0 and tasks is not None
           and not any(_kind_matches(k, t) for t in tasks)]
  if empty:
    raise ConfigError(f"config.rl.{field}: no generated task is of kind {empty} "
                      f"(config.rl.num_tasks / hard_fraction)")
  return mix


def _check_dapo_fields(rl: ConfigDict) -> None:
  if not 0 <= rl.overlong_buffer < rl.max_new_tokens:
    raise ConfigError(f"config.rl.overlong_buffer must be in [0, max_new_tokens="
                      f"{rl.max_new_tokens}), got {rl.overlong_buffer}")
  if rl.dynamic_sampling_max_batches < 1:
    raise ConfigError(f"config.rl.dynamic_sampling_max_batches must be >= 1, got "
                      f"{rl.dynamic_sampling_max_batches}")
  if rl.updates_per_batch < 1:
    raise ConfigError(f"config.rl.updates_per_batch must be >= 1, got {rl.updates_per_batch}")


def select_groups(advantages: list[list[np.ndarray]], count: int, dynamic: bool) -> list[int]:
  """Indices of the groups to train on: all of them, or with DAPO dynamic sampling the
  first `count` that carry a gradient signal (`step_srpo.has_signal`)."""
  if not dynamic:
    return list(range(len(advantages)))
  return [i for i, advs in enumerate(advantages) if step_srpo.has_signal(advs)][:count]


def _initial_model(config: ConfigDict):
  from kat_jax.train.models import load_model, load_run  # pylint: disable=g-import-not-at-top
  if config.rl.init_sft_workdir:
    if not os.path.isdir(os.path.join(config.rl.init_sft_workdir, "checkpoints")):
      raise ConfigError(f"config.rl.init_sft_workdir: no checkpoints under "
                        f"{config.rl.init_sft_workdir}")
    return load_run(config, config.rl.init_sft_workdir)
  return load_model(config)


class _Rollouts:
  """Samples AutoThink rollouts for prompt groups with the KV-cache sampler."""

  def __init__(self, model_config, tokenizer, rl: ConfigDict):
    from kat_jax.sampling import (Sampler, SamplingParams,  # pylint: disable=g-import-not-at-top
                                  think_mode_prompts)
    self.sampler = Sampler(model_config, pad_id=tokenizer.pad_id)
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


def _plot_curves(history: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for key, label in (("reward", "mean reward"), ("accuracy", "accuracy")):
    axes[0].plot(steps, [h[key] for h in history], label=label)
  for key, label in (("think_on_rate_easy", "easy"), ("think_on_rate_hard", "hard")):
    axes[1].plot(steps, [h[key] if h[key] is not None else np.nan for h in history], label=label)
  axes[2].plot(steps, [h["response_tokens"] for h in history])
  for ax, title in zip(axes, ("reward", "think-on rate", "tokens per response")):
    ax.set_title(title)
    ax.set_xlabel("RL step")
  axes[0].legend()
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  available = lambda kind: any(_kind_matches(kind, task_pool[i]) for i in pool.active)  # noqa: E731
  try:
    kinds = mix.sample_domains(step, count, rng, available)
  except ValueError:  # every kind of the mix was dropped: draw from all active prompts
    kinds = [None] * count
  chosen = []
  for kind in kinds:
    accept = ((lambda i: True) if kind is None  # noqa: E731
              else (lambda i, k=kind: _kind_matches(k, task_pool[i])))
    chosen.append(task_pool[pool.draw(accept, rng)])
  return chosen


def _rollout_round(rollouts: _Rollouts, dparams, tasks: list[task_lib.Task], key,
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


def run_step_srpo(config: ConfigDict) -> dict[str, Any]:
  """Runs Step-SRPO; returns the last step's statistics."""
  rl = config.rl
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = get_tokenizer(config.data.tokenizer)
  try:
    objective = ObjectiveConfig(**rl.objective.to_dict(),
                                max_response_length=rl.max_new_tokens)
    srpo_cfg = step_srpo.StepSRPOConfig(**rl.step_srpo.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.rl: {e}") from e
  _check_dapo_fields(rl)
  task_pool = {t.id: t for t in task_lib.generate_tasks(rl.num_tasks, rl.task_seed,
                                                        hard_fraction=rl.hard_fraction)}
  mix = TwoStageMix(_parse_mix(rl.stage1_mix, "stage1_mix", list(task_pool.values())),
                    _parse_mix(rl.stage2_mix, "stage2_mix", list(task_pool.values())),
                    rl.switch_step)
  model_config, params = _initial_model(config)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  optimizer = make_optimizer(config.optim, rl.steps * rl.updates_per_batch)
  pool = HistoryResampler(list(task_pool), seed=config.seed)
  heldout = task_lib.generate_tasks(rl.eval_prompts, rl.task_seed + 1,
                                    hard_fraction=rl.hard_fraction)
  mode_tags = [tokenizer.token_to_id("<think_on>"), tokenizer.token_to_id("<think_off>")]
  rollouts = _Rollouts(model_config, tokenizer, rl)
  # Verifiers run off the training thread; code runs in the sandbox (kat_jax/rl/rewards)
  # under config.rl.code_time_limit.
  reward_pool = RewardPool(max_workers=rl.reward_workers, item_timeout_s=rl.code_time_limit + 5,
                           code_timeout_s=rl.code_time_limit)
  logger = MetricsLogger(workdir, rl.steps, tensorboard=config.train.tensorboard)
  checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.train.checkpoint_every,
                                 keep=config.train.keep_checkpoints,
                                 async_save=config.train.async_checkpoint)
  from kat_jax.sampling import prepare_params  # pylint: disable=g-import-not-at-top
  history: list[dict[str, Any]] = []
  curves_path = os.path.join(workdir, "rl_curves.json")
  if os.path.exists(curves_path):
    with open(curves_path, encoding="utf-8") as f:
      history = json.load(f)["history"]

  with sharding_context(mesh):
    state, shardings = init_sharded_state(model_config, optimizer, mesh,
                                          jax.random.key(config.seed), params=params)
    # The frozen reference is the initial policy (also after a resume). A copy, not an
    # alias: `policy_step` donates the train state, and the placed `params` share its buffers.
    ref_params = jax.tree.map(jnp.copy, state.params) if objective.beta else None
    del params
    start_step = 0
    if checkpointer.latest_step() is not None:
      state, meta = checkpointer.restore(state, None)
      if "resampler" in meta:  # prompt pool, epoch position and history of the run
        pool.load_state_dict(meta["resampler"])
      # Checkpoints are numbered by RL step (an update may be skipped under dynamic
      # sampling); older ones, without "rl_step", by optimizer update.
      start_step = int(meta.get("rl_step", int(state.step) // rl.updates_per_batch))
      history = [h for h in history if h["step"] <= start_step]
      logger.status(f"resumed after RL step {start_step} (update {int(state.step)})")
    batch_sh = batch_sharding(mesh)
    # Ratios and KL are taken under the tempered distribution the rollouts came from.
    temperature = rl.temperature if rl.temperature > 0 else 1.0
    policy_step = jax.jit(make_policy_step(model_config, optimizer, objective,
                                           loss_chunk=config.train.loss_chunk,
                                           temperature=temperature),
                          in_shardings=(shardings, batch_sh),
                          out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    logprob_fn = jax.jit(make_logprob_fn(model_config, loss_chunk=config.train.loss_chunk,
                                         temperature=temperature),
                         in_shardings=(shardings.params, batch_sh), out_shardings=batch_sh)
    logger.status(f"step_srpo: {rl.steps} steps x {rl.prompts_per_step} prompts x "
                  f"{rl.group_size} rollouts, workdir {workdir}")
    stats: dict[str, Any] = {}
    for step in range(start_step, rl.steps):
      t0 = time.perf_counter()
      # Prompt draws and sampling keys depend on (seed, step) and the restored prompt pool
      # only, so a resumed run continues as the uninterrupted one would.
      step_rng = np.random.default_rng([config.seed, step])
      dparams = prepare_params(state.params, model_config, mesh)
      rounds = []
      for _ in range(rl.dynamic_sampling_max_batches if rl.dynamic_sampling else 1):
        tasks = _draw_tasks(pool, task_pool, mix, step, rl.prompts_per_step, step_rng)
        rounds.append(_rollout_round(rollouts, dparams, tasks,
                                     jax.random.key(step_rng.integers(2**31)), reward_pool,
                                     srpo_cfg, mode_tags, rl))
        with_signal = sum(step_srpo.has_signal(a) for r in rounds for a in r["advantages"])
        if not rl.dynamic_sampling or with_signal >= rl.prompts_per_step:
          break
      del dparams
      sampled = {k: [x for r in rounds for x in r[k]] for k in rounds[0]}
      for task, group in zip(sampled["tasks"], sampled["srpo"]):
        pool.record(task.id, [r.score for r in group])
      keep = select_groups(sampled["advantages"], rl.prompts_per_step, rl.dynamic_sampling)
      metrics: dict[str, Any] = {}
      if keep:
        batch = _policy_batch([sampled["prompts"][i] for i in keep],
                              [sampled["groups"][i] for i in keep],
                              [sampled["advantages"][i] for i in keep],
                              objective, tokenizer.pad_id, mesh)
        batch["old_logp"] = logprob_fn(state.params, batch)  # kept for every update below
        if ref_params is not None:
          batch["ref_logp"] = logprob_fn(ref_params, batch)
        for _ in range(rl.updates_per_batch):
          state, metrics = policy_step(state, batch)
        logger.count_tokens(float(np.sum(np.asarray(batch["kl_weight"]) > 0)))
      else:
        logger.status(f"step {step + 1}: no group with a gradient signal; no update")
      resampling = None
      if pool.epoch_complete:  # one pass over the prompts of a kind in use
        resampling = pool.end_epoch(drop=rl.history_resampling)
        logger.status(f"step {step + 1}: epoch {resampling['epoch']} done: {resampling}")
      stats = _step_stats(step, sampled, srpo_cfg, mix, pool, metrics, resampling)
      stats.update(policy_updates=int(state.step), trained_groups=len(keep),
                   seconds=time.perf_counter() - t0)
      if stats["reward_timeouts"] or stats["reward_errors"]:
        bad = [r for r in sampled["results"] if r.status in ("timeout", "error")]
        logger.status(f"step {step + 1}: rewards: {stats['reward_timeouts']:.0f} timeouts, "
                      f"{stats['reward_errors']:.0f} errors (e.g. {bad[0].kind} "
                      f"{bad[0].status}: {bad[0].detail})")
      history.append(stats)
      logger.write(step + 1, {k: v for k, v in stats.items()
                              if isinstance(v, float) and k != "step"})
      checkpointer.save(step + 1, state, None,
                        {"config": config.to_dict(), "rl_step": step + 1,
                         "resampler": pool.state_dict()}, force=step + 1 == rl.steps)
      with open(curves_path, "w", encoding="utf-8") as f:
        json.dump({"history": history}, f, indent=1)
  checkpointer.close()
  logger.close()
  reward_pool.close()
  if history:
    _plot_curves(history, os.path.join(workdir, "rl_curves.png"))
  summary = {"last": stats, "heldout": _evaluate(state.params, model_config, tokenizer, heldout,
                                                  rl)}
  with open(os.path.join(workdir, "rl_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  logger.status(f"held-out: {json.dumps(summary['heldout'])}")
  return summary


def _evaluate(params, model_config, tokenizer, tasks, rl: ConfigDict) -> dict[str, Any]:
  """Greedy AutoThink evaluation on held-out generated prompts."""
  from kat_jax.autothink.generation import evaluate_autothink, kat_generate_fn  # pylint: disable=g-import-not-at-top
  generate = kat_generate_fn(jax.device_get(params), model_config, tokenizer, think_mode="auto",
                             max_new_tokens=rl.max_new_tokens, temperature=0.0)
  summary, _ = evaluate_autothink(generate, tasks, time_limit=rl.code_time_limit)
  return summary
