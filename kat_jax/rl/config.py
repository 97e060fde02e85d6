"""`config.rl` (stage `step_srpo`): the schema, its checks, and the typed configs it fills
(`ObjectiveConfig` in rl/objectives.py, `StepSRPOConfig` in rl/step_srpo.py)."""

from __future__ import annotations

from ml_collections import ConfigDict

from kat_jax.tasks import dual_regime as task_lib
from kat_jax.errors import ConfigError
from kat_jax.field_checks import at_least, check_section, one_of
from kat_jax.rl import step_srpo
from kat_jax.rl.objectives import ObjectiveConfig


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
      # Rollouts ahead of the trainer (kat_jax/rl/pipeline.py): 0 = on-policy (sample, then
      # update); k >= 1 = batches sampled while earlier ones train, tokens at most k updates old.
      max_staleness=0,
      rollout_devices=0,  # > 0: these many devices generate, apart from the trainer's; 0 = share
      train_devices=0,  # with rollout_devices: the trainer's devices (0 = all the others)
      rollout_tensor=1,  # tensor-parallel size of the rollout mesh (its other axis: data)
      pack="tree",  # tree: a group's samples are one prefix tree (prompt once) | unrolled
      objective=ConfigDict(dict(eps_low=0.2, eps_high=0.28, dual_clip=0.0, beta=0.0,
                                kl_estimator="k3", entropy_coef=0.0,
                                loss_agg_mode="seq-mean-token-mean",
                                is_cap=2.0)),  # off-policy importance weight cap
      step_srpo=ConfigDict(dict(margin=0.0, wrong_mode_scale=0.5, format_penalty=1.0,
                                judge_weight=0.5, intermediate_supervision=True,
                                force_fraction=0.25, advantage_estimator="grpo")),
  ))


def kind_matches(kind: str, task: task_lib.Task) -> bool:
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


def parse_mix(text: str, field: str, tasks: list[task_lib.Task] | None = None
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
           and not any(kind_matches(k, t) for t in tasks)]
  if empty:
    raise ConfigError(f"config.rl.{field}: no generated task is of kind {empty} "
                      f"(config.rl.num_tasks / hard_fraction)")
  return mix


def _check_dapo_fields(rl: ConfigDict) -> None:
  if not 0 <= rl.overlong_buffer < rl.max_new_tokens:
    raise ConfigError(f"config.rl.overlong_buffer must be in [0, max_new_tokens="
                      f"{rl.max_new_tokens}), got {rl.overlong_buffer}")
  check_section(rl, "rl", {
      "dynamic_sampling_max_batches": at_least(1), "updates_per_batch": at_least(1),
      "max_staleness": at_least(0), "pack": one_of("tree", "unrolled"),
      "rollout_tensor": at_least(1)})


def typed_configs(rl: ConfigDict) -> tuple[ObjectiveConfig, step_srpo.StepSRPOConfig]:
  """(policy objective, Step-SRPO reward config) of `config.rl`, checked (ConfigError)."""
  try:
    objective = ObjectiveConfig(**rl.objective.to_dict(), max_response_length=rl.max_new_tokens)
    srpo_cfg = step_srpo.StepSRPOConfig(**rl.step_srpo.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.rl: {e}") from e
  _check_dapo_fields(rl)
  return objective, srpo_cfg
