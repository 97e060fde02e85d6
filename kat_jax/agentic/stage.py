"""The `agentic_rl` stage: tree rollouts -> rewards -> group advantages -> packed trees -> updates.

    python -m experiments.run --config experiments/configs/agentic_rl.py

One RL step: every task of the step gets a tree of episodes (`tree_rollout`, branching at the
configured turns, behaviour log-probs and entropies recorded by the sampler); rewards become
GRPO-family group advantages (a group = one task's tree); the group is optionally pruned by
entropy under a token budget (`pruning.prune_group`); the trees are packed depth-first into
fixed [rows, seq_len] batches (or, for comparison, one row per trajectory: `pack=unrolled`)
and `updates_per_step` policy updates run over row chunks of `rows_per_update`, with one
jitted step (fixed shapes: the batch is padded with inert rows).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from kat_jax.agentic.environments import make_environment
from kat_jax.agentic.pruning import build_pruned_trees, prune_group
from kat_jax.agentic.rollout import RolloutConfig, tree_rollout
from kat_jax.agentic.tree import build_trees, pack_trees, unrolled_batch
from kat_jax.data.packing import pad_batch_rows
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.parallel import init_sharded_state, make_mesh, sharding_context
from kat_jax.rl.objectives import ObjectiveConfig, group_advantages
from kat_jax.rl.policy_step import POLICY_INPUTS, make_logprob_fn, make_policy_step
from kat_jax.sampling import Sampler, SamplingParams, prepare_params
from kat_jax.train.optimizer import make_optimizer


def agentic_fields() -> ConfigDict:
  """`config.agentic`: environment, rollout tree shape, pruning, packing, objective."""
  return ConfigDict(dict(
      env="digits",  # digits | python | repo_repair (kat_jax.agentic.environments)
      env_kwargs={},
      tasks_per_step=4,
      branching="8",  # comma-separated copies per turn, e.g. "4,2": 4 at turn 0, 2 at turn 1
      max_turns=2,
      max_new_tokens=4,
      max_length=512,  # KV-cache slots per episode
      temperature=1.0,
      vocab_limit=0,  # >0: sample only ids below it (e.g. 128 = ASCII for the byte tokenizer)
      template="qwen2.5",
      tool_format="qwen2.5",  # or qwen3_coder
      success_threshold=1.0,  # an episode succeeds if reward >= this
      prune_budget=0,  # tree tokens kept per group; 0 = no pruning
      prune_score="entropy_reach",
      pack="tree",  # tree | unrolled
      seq_len=1024,
      rows_per_update=4,
      advantage="grpo",  # grpo | drgrpo
      loss_agg_mode="seq-mean-token-mean",
      eps_low=0.2, eps_high=0.28, beta=0.0, entropy_coef=0.0,
  ))


def _branching(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in str(text).split(",") if v.strip())
  except ValueError as e:
    raise ConfigError(f"config.agentic.branching {text!r}: comma-separated ints") from e
  if not values or any(v < 1 for v in values):
    raise ConfigError(f"config.agentic.branching {text!r}: needs ints >= 1")
  return values


def objective_from(ag: ConfigDict) -> ObjectiveConfig:
  try:
    return ObjectiveConfig(eps_low=ag.eps_low, eps_high=ag.eps_high, beta=ag.beta,
                           entropy_coef=ag.entropy_coef, loss_agg_mode=ag.loss_agg_mode)
  except ValueError as e:
    raise ConfigError(f"config.agentic: {e}") from e


def rl_batch(groups, advantages, ag: ConfigDict, objective: ObjectiveConfig, pad_id: int
             ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """Episodes + per-episode advantages -> a [B, seq_len] batch (B a multiple of rows_per_update)."""
  k = 0
  trajectories, entropies = [], []
  for group in groups:
    trajectories.append([e.trajectory(float(advantages[k + i])) for i, e in enumerate(group)])
    entropies.append([e.entropy_array for e in group])
    k += len(group)
  stats: dict[str, float] = {"unrolled_tokens": float(sum(len(t.tokens) for g in trajectories
                                                            for t in g))}
  if ag.pack == "unrolled":
    batch = unrolled_batch(trajectories, objective, ag.seq_len, pad_id)
  elif ag.pack == "tree":
    if ag.prune_budget:
      pruned = [prune_group(t, e, ag.prune_budget, ag.prune_score, objective)
                for t, e in zip(trajectories, entropies)]
      trees = build_pruned_trees(pruned, objective)
      stats["weight_mass_kept"] = float(np.mean([p.report.weight_mass_kept for p in pruned]))
    else:
      trees = build_trees(trajectories, objective)
    stats["tree_tokens"] = float(sum(t.num_nodes for t in trees))
    batch = pack_trees(trees, ag.seq_len, pad_id)
  else:
    raise ConfigError(f"config.agentic.pack {ag.pack!r} not in ['tree', 'unrolled']")
  stats["rows"] = float(len(batch["tokens"]))
  return pad_batch_rows(batch, ag.rows_per_update, pad_id), stats


def run_agentic_rl(config: ConfigDict) -> dict[str, Any]:
  """Stage `agentic_rl`. Returns the last step's metrics; writes <workdir>/agentic_metrics.json."""
  from kat_jax.train.loop import model_config_from  # pylint: disable=g-import-not-at-top
  if "agentic" not in config:
    raise ConfigError("config.agentic is missing; start from experiments/configs/agentic_rl.py")
  ag = config.agentic
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = get_tokenizer(config.data.tokenizer)
  model_config = model_config_from(config.model)
  objective = objective_from(ag)
  rollout_cfg = RolloutConfig(
      branching=_branching(ag.branching), max_turns=ag.max_turns,
      max_new_tokens=ag.max_new_tokens, max_length=ag.max_length,
      sampling=SamplingParams(ag.temperature, vocab_limit=ag.vocab_limit),
      template=ag.template, tool_format=ag.tool_format)
  make_env = lambda: make_environment(ag.env, **dict(ag.env_kwargs))  # noqa: E731
  steps = config.train.steps
  optimizer = make_optimizer(config.optim, steps)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  sampler = Sampler(model_config, pad_id=tokenizer.pad_id, prefill_chunk=256)
  history = []
  rng = jax.random.key(config.seed + 1)
  with sharding_context(mesh):
    state, shardings = init_sharded_state(model_config, optimizer, mesh,
                                          jax.random.key(config.seed))
    step_fn = jax.jit(make_policy_step(model_config, optimizer, objective,
                                       loss_chunk=config.train.loss_chunk),
                      donate_argnums=(0,))
    if objective.beta:  # the reference policy is the initial one; its log-probs per batch
      ref_params = jax.tree.map(jnp.copy, state.params)
      ref_fn = jax.jit(make_logprob_fn(model_config, loss_chunk=config.train.loss_chunk))
    for step in range(steps):
      t0 = time.perf_counter()
      rng, key = jax.random.split(rng)
      tasks = [step * ag.tasks_per_step + i for i in range(ag.tasks_per_step)]
      groups = tree_rollout(sampler, prepare_params(state.params, model_config), make_env,
                            tasks, tokenizer, key, rollout_cfg)
      rewards = np.array([e.reward for g in groups for e in g])
      group_ids = np.array([i for i, g in enumerate(groups) for _ in g])
      advantages = group_advantages(rewards, group_ids, estimator=ag.advantage)
      t1 = time.perf_counter()
      batch, stats = rl_batch(groups, advantages, ag, objective, tokenizer.pad_id)
      if objective.beta:
        batch["ref_logp"] = np.asarray(ref_fn(ref_params, batch))
      metrics: dict[str, Any] = {}
      for start in range(0, len(batch["tokens"]), ag.rows_per_update):
        chunk = {k: batch[k][start:start + ag.rows_per_update] for k in POLICY_INPUTS}
        state, metrics = step_fn(state, chunk)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      record = {"step": step + 1, "reward_mean": float(rewards.mean()),
                "success_rate": float(np.mean(rewards >= ag.success_threshold)),
                "episodes": len(rewards), "rollout_s": t1 - t0,
                "update_s": time.perf_counter() - t1, **stats, **metrics}
      history.append(record)
      if (step + 1) % config.train.log_every == 0 or step + 1 == steps:
        print(f"agentic_rl step {step + 1}/{steps}: reward {record['reward_mean']:.3f} "
              f"success {record['success_rate']:.2f} loss {metrics.get('loss', 0):.4f} "
              f"tokens tree {stats.get('tree_tokens', 0):.0f} / unrolled "
              f"{stats['unrolled_tokens']:.0f}", flush=True)
  with open(os.path.join(workdir, "agentic_metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"config": config.to_dict(), "history": history}, f, indent=1, default=str)
  return history[-1]
