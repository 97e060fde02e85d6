"""The `agentic_rl` stage: tree rollouts -> rewards -> group advantages -> packed trees -> updates.

    python -m experiments.run --config experiments/configs/agentic_rl.py

One RL step: every task of the step gets a tree of episodes (`tree_rollout`, branching at the
configured turns, behaviour log-probs and entropies recorded by the sampler); rewards become
GRPO-family group advantages (a group = one task's tree); the group is optionally pruned by
entropy under a token budget (`pruning.prune_group`); the trees are packed depth-first into
fixed [rows, seq_len] batches (or, for comparison, one row per trajectory: `pack=unrolled`)
and ONE optimizer update is taken over all rows: gradients are summed over micro-batches of
`micro_batch_rows` rows (one jitted gradient of fixed shape; the batch is padded with inert
rows). The loss weights hold the whole batch's normaliser, so the summed gradient and loss
are those of the whole batch, and tree and unrolled packing take the same update.

`mode=decoupled` runs the same update on rollouts made by `rollout_workers` worker threads
that read weight snapshots and hand tree groups over a queue (`decoupled.run_decoupled`);
a batch sampled more than `max_staleness` updates ago is dropped.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from kat_jax.agentic.decoupled import RolloutBatch, run_decoupled
from kat_jax.agentic.environments import make_environment
from kat_jax.agentic.pruning import build_pruned_trees, prune_group
from kat_jax.agentic.rollout import RolloutConfig, tree_rollout
from kat_jax.rl.tree import build_trees, pack_trees, unrolled_batch
from kat_jax.data.packing import pad_batch_rows
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig
from kat_jax.parallel import make_mesh, sharding_context
from kat_jax.rl.objectives import ObjectiveConfig, group_advantages
from kat_jax.rl.policy_step import POLICY_INPUTS, make_logprob_fn, make_policy_loss_fn
from kat_jax.sampling import Sampler, SamplingParams, prepare_params
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import TrainState, init_sharded_state


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
      micro_batch_rows=4,  # rows per gradient micro-batch; one optimizer update per step
      mode="sync",  # sync | decoupled (rollout worker threads, queue, weight snapshots)
      rollout_workers=1,  # decoupled: worker threads
      max_staleness=1,  # decoupled: drop batches sampled more than this many updates ago
      publish_every=1,  # decoupled: write a weight snapshot every this many updates
      queue_size=2,  # decoupled: rollout batches waiting for the trainer (back-pressure)
      decoupled_timeout_s=0.0,  # decoupled: give up after this long (0 = never)
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
  """Episodes + per-episode advantages -> a [B, seq_len] batch (B a multiple of micro_batch_rows).

  Stats: token counts, and with pruning the summed `PruneReport` counts of all groups
  (kept/total tree tokens, kept/partial/total trajectories) and the mean weight mass kept.
  """
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


class AccumulatedPolicyUpdate:
  """One optimizer update over all rows of a batch, in micro-batches of a fixed shape.

  The policy weights already carry the whole batch's aggregation normaliser, so the batch
  loss and gradient are plain sums over micro-batches: `loss`, `policy_loss`, `kl` and
  `entropy` are summed, `clip_fraction` is averaged over active tokens, `grad_norm` is the
  norm of the summed gradient.
  """

  def __init__(self, model_config: ModelConfig, optimizer: optax.GradientTransformation,
               objective: ObjectiveConfig, micro_batch_rows: int, loss_chunk: int,
               ref_params: Any = None):
    self.rows, self.optimizer = micro_batch_rows, optimizer
    self.grad_fn = jax.jit(jax.value_and_grad(
        make_policy_loss_fn(model_config, objective, loss_chunk=loss_chunk), has_aux=True))
    self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))
    self.apply = jax.jit(self._apply, donate_argnums=(0,))
    self.ref_params = ref_params if objective.beta else None
    self.ref_fn = (jax.jit(make_logprob_fn(model_config, loss_chunk=loss_chunk))
                   if objective.beta else None)

  def _apply(self, state: TrainState, grads: Any) -> tuple[TrainState, jax.Array]:
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
            optax.tree.norm(grads))

  def __call__(self, state: TrainState, batch: dict[str, np.ndarray]
               ) -> tuple[TrainState, dict[str, float]]:
    """batch: [B, T] arrays, B a multiple of micro_batch_rows -> (state, metrics).

    `state` is donated: its buffers are reused for the new state.
    """
    total_rows = len(batch["tokens"])
    if total_rows % self.rows:
      raise ValueError(f"batch of {total_rows} rows is not a multiple of micro_batch_rows "
                       f"{self.rows}; pad it with pad_batch_rows")
    grads, sums, clipped, active = None, {}, 0.0, 0.0
    for start in range(0, total_rows, self.rows):
      chunk = {k: batch[k][start:start + self.rows] for k in POLICY_INPUTS if k in batch}
      if self.ref_fn is not None:  # the reference policy's log-probs of this micro-batch
        chunk["ref_logp"] = self.ref_fn(self.ref_params, chunk)
      (loss, metrics), g = self.grad_fn(state.params, chunk)
      grads = g if grads is None else self.add(grads, g)
      chunk_active = float(np.sum(chunk["kl_weight"] > 0))
      for key, value in {**metrics, "loss": loss}.items():
        if key == "clip_fraction":
          clipped += value * chunk_active
        else:
          sums[key] = sums.get(key, 0.0) + value
      active += chunk_active
    state, grad_norm = self.apply(state, grads)
    metrics = {k: float(v) for k, v in jax.device_get(sums).items()}
    metrics["clip_fraction"] = float(clipped) / max(active, 1.0)
    metrics["grad_norm"] = float(grad_norm)
    metrics["micro_batches"] = float(total_rows // self.rows)
    return state, metrics


def _check_fields(ag: ConfigDict) -> None:
  if ag.mode not in ("sync", "decoupled"):
    raise ConfigError(f"config.agentic.mode {ag.mode!r} not in ['sync', 'decoupled']")
  if ag.pack not in ("tree", "unrolled"):
    raise ConfigError(f"config.agentic.pack {ag.pack!r} not in ['tree', 'unrolled']")
  for name, low in (("micro_batch_rows", 1), ("tasks_per_step", 1), ("rollout_workers", 1),
                    ("max_staleness", 0), ("publish_every", 1), ("queue_size", 1),
                    ("prune_budget", 0)):
    if int(ag[name]) < low:
      raise ConfigError(f"config.agentic.{name} must be >= {low}, got {ag[name]}")


def run_agentic_rl(config: ConfigDict) -> dict[str, Any]:
  """Stage `agentic_rl`. Returns the last step's metrics; writes <workdir>/agentic_metrics.json.

  Every step (sync) or update (decoupled) is one optimizer update; its record holds the
  rollout stats (reward, success rate), the batch stats of `rl_batch`, the summed loss of
  `AccumulatedPolicyUpdate` and, decoupled, the batch's staleness.
  """
  from kat_jax.train.models import model_config_from  # pylint: disable=g-import-not-at-top
  if "agentic" not in config:
    raise ConfigError("config.agentic is missing; start from experiments/configs/agentic_rl.py")
  ag = config.agentic
  _check_fields(ag)
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

  def rollout_fn(params, tasks, key) -> list:
    dparams = prepare_params(params, model_config, mesh)
    return tree_rollout(sampler, dparams, make_env, tasks, tokenizer, key, rollout_cfg)

  with sharding_context(mesh):
    state, _ = init_sharded_state(model_config, optimizer, mesh, jax.random.key(config.seed))
    # The reference policy (beta > 0) is the initial one.
    ref_params = jax.tree.map(jnp.copy, state.params) if objective.beta else None
    update = AccumulatedPolicyUpdate(model_config, optimizer, objective, ag.micro_batch_rows,
                                     config.train.loss_chunk, ref_params)

    def train_on(state, groups) -> tuple[TrainState, dict[str, Any]]:
      t0 = time.perf_counter()
      rewards = np.array([e.reward for g in groups for e in g])
      group_ids = np.array([i for i, g in enumerate(groups) for _ in g])
      advantages = group_advantages(rewards, group_ids, estimator=ag.advantage)
      batch, stats = rl_batch(groups, advantages, ag, objective, tokenizer.pad_id)
      state, metrics = update(state, batch)
      record = {"step": int(state.step), "reward_mean": float(rewards.mean()),
                "success_rate": float(np.mean(rewards >= ag.success_threshold)),
                "episodes": len(rewards), **stats, **metrics,
                "update_s": time.perf_counter() - t0}
      if record["step"] % config.train.log_every == 0 or record["step"] == steps:
        _print_step(record, steps)
      return state, record

    if ag.mode == "sync":
      history = []
      rng = jax.random.key(config.seed + 1)
      for step in range(steps):
        t0 = time.perf_counter()
        rng, key = jax.random.split(rng)
        tasks = [step * ag.tasks_per_step + i for i in range(ag.tasks_per_step)]
        groups = rollout_fn(state.params, tasks, key)
        rollout_s = time.perf_counter() - t0
        state, record = train_on(state, groups)
        history.append({**record, "rollout_s": rollout_s})
    else:
      history = _run_decoupled_mode(config, state, train_on, rollout_fn, workdir)
  with open(os.path.join(workdir, "agentic_metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"config": config.to_dict(), "history": history}, f, indent=1, default=str)
  return history[-1]


def _run_decoupled_mode(config: ConfigDict, state: TrainState, train_on, rollout_fn,
                        workdir: str) -> list[dict[str, Any]]:
  """`config.train.steps` updates on rollouts from worker threads -> per-update records."""
  ag = config.agentic
  counter, lock = [0], threading.Lock()

  def task_fn(worker: int, i: int) -> list[int]:
    del worker, i  # tasks are numbered across workers in the order batches are started
    with lock:
      batch, counter[0] = counter[0], counter[0] + 1
    return [batch * ag.tasks_per_step + j for j in range(ag.tasks_per_step)]

  def train_fn(state, batch: RolloutBatch):
    state, record = train_on(state, batch.groups)
    del record["step"]  # run_decoupled numbers the updates
    return state, record

  _, log = run_decoupled(
      state, train_fn, rollout_fn, task_fn, os.path.join(workdir, "rollout_weights"),
      num_updates=config.train.steps, num_workers=ag.rollout_workers,
      publish_every=ag.publish_every, max_staleness=ag.max_staleness,
      queue_size=ag.queue_size,
      timeout_s=float(ag.decoupled_timeout_s) or float("inf"), seed=config.seed)
  return [{"step": r["update"], **r} for r in log]


def _print_step(record: dict[str, Any], steps: int) -> None:
  print(f"agentic_rl step {record['step']}/{steps}: reward {record['reward_mean']:.3f} "
        f"success {record['success_rate']:.2f} loss {record['loss']:.4f} tokens tree "
        f"{record.get('tree_tokens', 0):.0f} / unrolled {record['unrolled_tokens']:.0f}",
        flush=True)
