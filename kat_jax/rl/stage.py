"""Stage `step_srpo`: AutoThink RL on the generated dual-regime tasks.

Each step: draw prompts (SRPO two-stage domain mix, history resampling) → sample a group of
rollouts per prompt with the KV-cache sampler (the model judges and picks its mode) → force
the other mode on part of any single-mode group → verify answers → Step-SRPO rewards and
segment advantages → recompute old (and reference) log-probs → clipped policy updates.
Curves (reward, think-on rate on easy/hard prompts, response length) go to
`<workdir>/rl_curves.json` and `.png`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from kat_jax.agentic.tree import Trajectory, unrolled_batch
from kat_jax.autothink import tasks as task_lib
from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.data.packing import pad_batch_rows
from kat_jax.data.chat_template import parse_autothink_response, tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.parallel import (batch_sharding, global_batch, init_sharded_state, make_mesh,
                              replicated, sharding_context)
from kat_jax.rl import step_srpo
from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import make_logprob_fn, make_policy_step
from kat_jax.rl.rewards import RewardPool
from kat_jax.train.metrics import MetricsLogger
from kat_jax.train.optimizer import make_optimizer


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
      code_time_limit=2.0,
      reward_workers=2,
      # SRPO data schedule: regime mixes before/after switch_step (regimes: easy, hard)
      stage1_mix="easy:0.5,hard:0.5",
      stage2_mix="easy:0.5,hard:0.5",
      switch_step=0,
      history_resampling=True,
      objective=ConfigDict(dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, beta=0.0,
                                kl_estimator="k3", entropy_coef=0.0,
                                loss_agg_mode="seq-mean-token-mean")),
      step_srpo=ConfigDict(dict(margin=0.0, wrong_mode_scale=0.5, format_penalty=1.0,
                                judge_weight=0.5, intermediate_supervision=True,
                                force_fraction=0.25, advantage_estimator="grpo")),
  ))


def _parse_mix(text: str, field: str) -> dict[str, float]:
  try:
    mix = {k.strip(): float(v) for k, v in (item.split(":") for item in text.split(","))}
  except ValueError as e:
    raise ConfigError(f"config.rl.{field} {text!r} is not 'regime:weight,...'") from e
  unknown = set(mix) - set(task_lib.REGIMES)
  if unknown:
    raise ConfigError(f"config.rl.{field}: unknown regimes {sorted(unknown)}; "
                      f"known {list(task_lib.REGIMES)}")
  return mix


def _initial_model(config: ConfigDict):
  from kat_jax.autothink.stage import trained_model  # pylint: disable=g-import-not-at-top
  from kat_jax.train.loop import load_model  # pylint: disable=g-import-not-at-top
  if config.rl.init_sft_workdir:
    if not os.path.isdir(os.path.join(config.rl.init_sft_workdir, "checkpoints")):
      raise ConfigError(f"config.rl.init_sft_workdir: no checkpoints under "
                        f"{config.rl.init_sft_workdir}")
    return trained_model(config, config.rl.init_sft_workdir)
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
  mix = TwoStageMix(_parse_mix(rl.stage1_mix, "stage1_mix"),
                    _parse_mix(rl.stage2_mix, "stage2_mix"), rl.switch_step)
  model_config, params = _initial_model(config)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  optimizer = make_optimizer(config.optim, rl.steps * rl.updates_per_batch)
  task_pool = {t.id: t for t in task_lib.generate_tasks(rl.num_tasks, rl.task_seed,
                                                        hard_fraction=rl.hard_fraction)}
  pool = HistoryResampler(list(task_pool))
  heldout = task_lib.generate_tasks(rl.eval_prompts, rl.task_seed + 1,
                                    hard_fraction=rl.hard_fraction)
  mode_tags = [tokenizer.token_to_id("<think_on>"), tokenizer.token_to_id("<think_off>")]
  rollouts = _Rollouts(model_config, tokenizer, rl)
  # Verifiers run off the training thread; code runs in the sandbox (kat_jax/rl/rewards).
  reward_pool = RewardPool(max_workers=rl.reward_workers, item_timeout_s=rl.code_time_limit + 5)
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
    ref_params = params if objective.beta else None
    del params
    if checkpointer.latest_step() is not None:
      state, _ = checkpointer.restore(state, None)
      history = [h for h in history if h["step"] <= int(state.step) // rl.updates_per_batch]
      logger.status(f"resumed from update {int(state.step)}")
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
    rng = np.random.default_rng(config.seed)
    logger.status(f"step_srpo: {rl.steps} steps x {rl.prompts_per_step} prompts x "
                  f"{rl.group_size} rollouts, workdir {workdir}")
    start_step = int(state.step) // rl.updates_per_batch
    stats: dict[str, Any] = {}
    for step in range(start_step, rl.steps):
      t0 = time.perf_counter()
      step_rng = np.random.default_rng([config.seed, step])
      by_regime = {r: [i for i in pool.active if task_pool[i].regime == r]
                   for r in task_lib.REGIMES}
      chosen = []
      for regime in mix.sample_domains(step, rl.prompts_per_step, step_rng):
        candidates = by_regime.get(regime) or pool.active
        chosen.append(task_pool[candidates[step_rng.integers(len(candidates))]])
      dparams = prepare_params(state.params, model_config)
      prompts, groups = rollouts.groups(dparams, chosen, jax.random.key(rng.integers(2**31)),
                                        srpo_cfg)
      del dparams
      texts = [[rollouts.text(ids) for ids, _, _ in group] for group in groups]
      parsed = [[parse_autothink_response(t, judge_prefilled=True) for t in g] for g in texts]
      results = reward_pool.score_async(
          [{"response": text, "verifier": task.verifier}
           for task, group_texts in zip(chosen, texts) for text in group_texts]).result()
      it = iter(r.reward for r in results)
      srpo_groups = [[step_srpo.Rollout(p["mode"], forced, float(next(it)), p["well_formed"])
                      for p, (_, _, forced) in zip(ps, group)]
                     for ps, group in zip(parsed, groups)]
      advantages, reward_stats = step_srpo.token_advantages(
          srpo_groups, [[ids for ids, _, _ in g] for g in groups], mode_tags, srpo_cfg)
      trajectories = []
      for prompt, group, advs in zip(prompts, groups, advantages):
        trajectories.append([
            Trajectory(prompt + ids, [0] * (len(prompt) + prefill) + [1] * (len(ids) - prefill),
                       np.concatenate([np.zeros(len(prompt)), adv]))
            for (ids, prefill, _), adv in zip(group, advs)])
      longest = max(len(t.tokens) for g in trajectories for t in g)
      seq_len = -(-longest // 64) * 64
      batch = unrolled_batch(trajectories, objective, seq_len, tokenizer.pad_id)
      batch = pad_batch_rows({k: v for k, v in batch.items() if k != "visits"},
                       mesh.shape["data"] * mesh.shape["fsdp"], tokenizer.pad_id)
      batch = global_batch(batch, mesh)
      batch["old_logp"] = logprob_fn(state.params, batch)
      if ref_params is not None:
        batch["ref_logp"] = logprob_fn(ref_params, batch)
      for _ in range(rl.updates_per_batch):
        state, metrics = policy_step(state, batch)
      for task, group in zip(chosen, srpo_groups):
        pool.record(task.id, [r.score for r in group])
      if rl.history_resampling and pool.seen >= len(pool.active):  # one epoch seen
        logger.status(f"history resampling: {pool.end_epoch()}")
      flat = [(task, r) for task, group in zip(chosen, srpo_groups) for r in group]
      free = [(task, r) for task, r in flat if not r.forced]
      stats = {
          "step": step + 1,
          "accuracy": float(np.mean([r.score for _, r in flat])),
          "format_rate": float(np.mean([r.well_formed for _, r in flat])),
          "think_on_rate_easy": _rate([r.mode == "think_on" for t, r in free
                                       if t.regime == "easy"]),
          "think_on_rate_hard": _rate([r.mode == "think_on" for t, r in free
                                       if t.regime == "hard"]),
          "response_tokens": float(np.mean([len(ids) for g in groups for ids, _, _ in g])),
          "forced": int(sum(r.forced for _, r in flat)),
          **reward_stats,
          **{k: float(v) for k, v in jax.device_get(metrics).items()},
          "seconds": time.perf_counter() - t0,
      }
      stats["reward"] = (reward_stats["answer_reward"]
                         + srpo_cfg.judge_weight * reward_stats["judge_reward"])
      history.append(stats)
      logger.count_tokens(float(np.sum(np.asarray(batch["kl_weight"]) > 0)))
      logger.write(step + 1, {k: v for k, v in stats.items()
                              if isinstance(v, float) and k != "step"})
      checkpointer.save(int(state.step), state, None, {"config": config.to_dict()},
                        force=step + 1 == rl.steps)
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
