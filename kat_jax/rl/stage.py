"""Stage `step_srpo`: AutoThink RL on the generated dual-regime tasks, on the trainer.

  python -m experiments.run --config experiments/configs/step_srpo.py

The batch source is `rollouts.StepSRPORollouts` (sample, verify, score, pack with behaviour
log-probs); the step takes `updates_per_batch` clipped policy updates on its batch. Curves
(reward, think-on rate on easy/hard prompts, response length) go to `<workdir>/rl_curves.json`
and `.png`, the held-out greedy evaluation to `rl_summary.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from kat_jax.tasks import dual_regime as task_lib
from kat_jax.checkpoint import models
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.parallel import batch_sharding
from kat_jax.progress import status
from kat_jax.rl.config import parse_mix, typed_configs
from kat_jax.rl.curriculum import TwoStageMix
from kat_jax.rl.pipeline import decode_weights_fn, rollout_meshes
from kat_jax.rl.policy_step import make_logprob_fn, make_policy_step
from kat_jax.tasks.rewards import RewardPool
from kat_jax.rl.autothink_groups import AutoThinkRollouts
from kat_jax.rl.rollouts import StepSRPORollouts
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import init_sharded_state
from kat_jax.train.trainer import Trainer


def _initial_model(config: ConfigDict):
  if config.rl.init_sft_workdir:
    if not os.path.isdir(os.path.join(config.rl.init_sft_workdir, "checkpoints")):
      raise ConfigError(f"config.rl.init_sft_workdir: no checkpoints under "
                        f"{config.rl.init_sft_workdir}")
    return models.load_model(config.rl.init_sft_workdir, what="config.rl.init_sft_workdir",
                             execution=models.config_from_model_fields(config.model))
  return models.load_configured_model(config.model, seed=config.seed)


def _updates(policy_step, count: int):
  """The trainer's step: `count` policy updates on one rollout batch (last update's metrics)."""
  def step(state, batch):
    metrics = {}
    for _ in range(count):
      state, metrics = policy_step(state, batch)
    return state, metrics
  return step


def run_step_srpo(config: ConfigDict) -> dict[str, Any]:
  """Runs Step-SRPO; returns the last step's statistics and the held-out evaluation."""
  rl = config.rl
  workdir = os.path.abspath(config.workdir)
  tokenizer = get_tokenizer(config.data.tokenizer)
  objective, srpo_cfg = typed_configs(rl)
  tasks = task_lib.generate_tasks(rl.num_tasks, rl.task_seed, hard_fraction=rl.hard_fraction)
  mix = TwoStageMix(parse_mix(rl.stage1_mix, "stage1_mix", tasks),
                    parse_mix(rl.stage2_mix, "stage2_mix", tasks), rl.switch_step)
  model_config, params = _initial_model(config)
  train_mesh, rollout_mesh = rollout_meshes(config, rl.rollout_devices, rl.train_devices,
                                            rl.rollout_tensor)
  trainer = Trainer(config, name="step_srpo", workdir=workdir, steps=rl.steps, mesh=train_mesh,
                    meta={"model_config": model_config.to_dict()})
  status(f"step_srpo: {rl.steps} steps x {rl.prompts_per_step} prompts x "
         f"{rl.group_size} rollouts, max_staleness {rl.max_staleness}"
         + (f", rollouts on {rollout_mesh.size} devices apart" if rollout_mesh is not train_mesh
            else ""))
  optimizer = make_optimizer(config.optim, rl.steps * rl.updates_per_batch)
  # Ratios and KL are taken under the tempered distribution the rollouts came from.
  temperature = rl.temperature if rl.temperature > 0 else 1.0
  loss_chunk = config.train.loss_chunk
  source = StepSRPORollouts(
      rl, seed=config.seed, rollouts=AutoThinkRollouts(model_config, tokenizer, rl),
      # Verifiers run off the training thread; code runs in the sandbox (kat_jax/tasks/rewards).
      reward_pool=RewardPool(max_workers=rl.reward_workers,
                             item_timeout_s=rl.code_time_limit + 5,
                             code_timeout_s=rl.code_time_limit),
      srpo_cfg=srpo_cfg, objective=objective, task_pool={t.id: t for t in tasks}, mix=mix,
      mode_tags=[tokenizer.token_to_id("<think_on>"), tokenizer.token_to_id("<think_off>")],
      mesh=trainer.mesh, curves_path=os.path.join(workdir, "rl_curves.json"),
      # [B, T] log-probs laid out like the batch they join (the step's input sharding)
      logprob_fn=jax.jit(make_logprob_fn(model_config, loss_chunk=loss_chunk,
                                         temperature=temperature),
                         out_shardings=batch_sharding(train_mesh)),
      rollout_prepare=decode_weights_fn(model_config, train_mesh, rollout_mesh,
                                        own_copy=rl.max_staleness > 0),
      rollout_mesh=rollout_mesh)

  def init_state():
    state, shardings = init_sharded_state(model_config, optimizer, trainer.mesh,
                                          jax.random.key(config.seed), params=params)
    if objective.beta:  # the frozen reference is the initial policy (also after a resume);
      # a copy: the step donates the state, and the placed `params` share its buffers
      source.ref_params = jax.tree.map(jnp.copy, state.params)
    return state, shardings

  step = _updates(make_policy_step(model_config, optimizer, objective, loss_chunk=loss_chunk,
                                   temperature=temperature), rl.updates_per_batch)
  result = trainer.fit(init_state, step, source)
  del params
  if source.history:
    _plot_curves(source.history, os.path.join(workdir, "rl_curves.png"))
  heldout = task_lib.generate_tasks(rl.eval_prompts, rl.task_seed + 1,
                                    hard_fraction=rl.hard_fraction)
  summary = {"last": source.history[-1] if source.history else {},
             "heldout": _evaluate(result.state.params, model_config, tokenizer, heldout, rl)}
  with open(os.path.join(workdir, "rl_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  status(f"held-out: {json.dumps(summary['heldout'])}")
  return summary


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


def _evaluate(params, model_config, tokenizer, tasks, rl: ConfigDict) -> dict[str, Any]:
  """Greedy AutoThink evaluation on held-out generated prompts."""
  from kat_jax.autothink.generation import evaluate_autothink, kat_generate_fn  # pylint: disable=g-import-not-at-top
  generate = kat_generate_fn(jax.device_get(params), model_config, tokenizer, think_mode="auto",
                             max_new_tokens=rl.max_new_tokens, temperature=0.0)
  summary, _ = evaluate_autothink(generate, tasks, time_limit=rl.code_time_limit)
  return summary
