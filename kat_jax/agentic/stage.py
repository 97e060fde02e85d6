"""The `agentic_rl` stage: tree rollouts feeding the trainer, one optimizer update per step.

    python -m experiments.run --config experiments/configs/agentic_rl.py

The batch source is `batches.TreeRollouts` (rollouts -> rewards -> group advantages ->
packed trees). The step is `rl.policy_step.AccumulatedPolicyUpdate`: ONE optimizer update
over all rows, gradients summed over micro-batches of `micro_batch_rows` rows (one jitted
gradient of fixed shape; the batch is padded with inert rows). The loss weights hold the
whole batch's normaliser, so tree and unrolled packing take the same update. Like every
stage it checkpoints (`<workdir>/checkpoints`) and resumes.

`agentic.max_staleness` k >= 1 rolls out up to k batches ahead of the trainer, on the
`rollout_devices` apart from the trainer's if set (`kat_jax.rl.pipeline`, as Step-SRPO does).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from kat_jax.agentic.batches import TreeRollouts
from kat_jax.agentic.config import check_fields, objective_from, rollout_config
from kat_jax.agentic.environments import make_environment
from kat_jax.agentic.rollout import tree_rollout
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.progress import status
from kat_jax.rl.pipeline import decode_weights_fn, rollout_meshes
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.rl.policy_step import AccumulatedPolicyUpdate
from kat_jax.sampling import EngineSampler
from kat_jax.checkpoint.models import config_from_model_fields
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import init_sharded_state
from kat_jax.train.trainer import Trainer


def run_agentic_rl(config: ConfigDict) -> dict[str, Any]:
  """Stage `agentic_rl`. Returns the last step's record; writes <workdir>/agentic_metrics.json.

  Every step is one optimizer update; its record holds the rollout stats (reward, success
  rate), the packing stats of `rl_batch`, the summed loss of `AccumulatedPolicyUpdate`, the
  batch's staleness and the step's time split."""
  if "agentic" not in config:
    raise ConfigError("config.agentic is missing; start from experiments/configs/agentic_rl.py")
  ag = config.agentic
  check_fields(ag)
  workdir = os.path.abspath(config.workdir)
  tokenizer = get_tokenizer(config.data.tokenizer)
  model_config = config_from_model_fields(config.model)
  objective = objective_from(ag)
  rollout_cfg = rollout_config(ag)
  make_env = lambda: make_environment(ag.env, **dict(ag.env_kwargs))  # noqa: E731
  steps = config.train.steps
  optimizer = make_optimizer(config.optim, steps)
  train_mesh, rollout_mesh = rollout_meshes(config, ag.rollout_devices, ag.train_devices,
                                            ag.rollout_tensor, fields="config.agentic")
  trainer = Trainer(config, name="agentic_rl", workdir=workdir, steps=steps, mesh=train_mesh,
                    meta={"model_config": model_config.to_dict()})
  status(f"agentic_rl: {steps} updates x {ag.tasks_per_step} tasks, branching "
         f"{ag.branching}, env {ag.env}, max_staleness {ag.max_staleness}"
         + (f", rollouts on {rollout_mesh.size} devices apart" if rollout_mesh is not train_mesh
            else ""))
  # The engine's settings; each tree rollout builds an engine of the room it needs.
  sampler = EngineSampler(model_config, pad_id=tokenizer.pad_id, prefill_chunk=256, num_slots=64)
  # Every sampled turn and reward goes here; each batch reads its trajectories from it.
  manager = TrajectoryManager()

  def rollout_fn(weights, tasks, key) -> tuple[list, dict[str, float]]:
    stats: dict[str, float] = {}
    groups = tree_rollout(sampler, weights, make_env, tasks, tokenizer, key, rollout_cfg,
                          manager=manager, stats=stats)
    return groups, stats

  source = TreeRollouts(
      ag, objective, pad_id=tokenizer.pad_id, seed=config.seed, steps=steps,
      rollout_fn=rollout_fn, manager=manager, rollout_mesh=rollout_mesh,
      rollout_prepare=decode_weights_fn(model_config, train_mesh, rollout_mesh,
                                        own_copy=ag.max_staleness > 0),
      metrics_path=os.path.join(workdir, "agentic_metrics.json"),
      config_dict=config.to_dict(), log_every=config.train.log_every)
  # Ratios and KL are taken under the tempered distribution the rollouts came from.
  update = AccumulatedPolicyUpdate(model_config, optimizer, objective, ag.micro_batch_rows,
                                   config.train.loss_chunk,
                                   temperature=ag.temperature if ag.temperature > 0 else 1.0)

  def init_state():
    state, shardings = init_sharded_state(model_config, optimizer, trainer.mesh,
                                          jax.random.key(config.seed))
    if objective.beta:  # the reference policy is the initial one
      update.ref_params = jax.tree.map(jnp.copy, state.params)
    return state, shardings

  trainer.fit(init_state, update, source, jit_step=False)
  return source.history[-1]
