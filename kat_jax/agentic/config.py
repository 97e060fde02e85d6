"""`config.agentic`: the schema, its checks, and the typed configs it fills
(`ObjectiveConfig`, `RolloutConfig`)."""

from __future__ import annotations

from ml_collections import ConfigDict

from kat_jax.agentic.rollout import RolloutConfig
from kat_jax.errors import ConfigError
from kat_jax.field_checks import at_least, check_section, one_of
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.sampling import SamplingParams


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
      # Rollouts ahead of the trainer (kat_jax/rl/pipeline.py), as config.rl's fields: 0 =
      # on-policy (roll out, then update); k >= 1 = batches rolled out while earlier ones train.
      max_staleness=0,
      rollout_devices=0,  # > 0: these many devices roll out, apart from the trainer's; 0 = share
      train_devices=0,  # with rollout_devices: the trainer's devices (0 = all the others)
      rollout_tensor=1,  # tensor-parallel size of the rollout mesh (its other axis: data)
      is_cap=2.0,  # off-policy batches: importance weight cap (ObjectiveConfig.is_cap)
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
                           entropy_coef=ag.entropy_coef, loss_agg_mode=ag.loss_agg_mode,
                           is_cap=ag.is_cap)
  except ValueError as e:
    raise ConfigError(f"config.agentic: {e}") from e


def check_fields(ag: ConfigDict) -> None:
  check_section(ag, "agentic", {
      "pack": one_of("tree", "unrolled"), "micro_batch_rows": at_least(1),
      "tasks_per_step": at_least(1), "max_staleness": at_least(0),
      "rollout_devices": at_least(0), "train_devices": at_least(0),
      "rollout_tensor": at_least(1), "prune_budget": at_least(0)})


def rollout_config(ag: ConfigDict) -> RolloutConfig:
  return RolloutConfig(
      branching=_branching(ag.branching), max_turns=ag.max_turns,
      max_new_tokens=ag.max_new_tokens, max_length=ag.max_length,
      # log-probs of the tempered distribution: the loss is tempered the same way
      sampling=SamplingParams(ag.temperature, vocab_limit=ag.vocab_limit, tempered_stats=True),
      template=ag.template, tool_format=ag.tool_format)
