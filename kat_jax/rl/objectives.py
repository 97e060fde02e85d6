"""GRPO-family objectives in one per-token form that also serves packed prefix trees.

Every variant (GRPO, DAPO, Dr. GRPO, with or without KL) is a sum over response tokens of

    - adv_pos[t] * min(r_t, 1 + eps_high)                          (A > 0 part)
    - adv_neg[t] * max(r_t, 1 - eps_low)   [dual clip: min(., c)]  (A < 0 part)
    + beta * kl_weight[t] * KL(t)          - entropy_coef * kl_weight[t] * H(t)

with `r_t = exp(logp_t - old_logp_t)`. Off-policy batches (rollouts sampled up to k updates
ago, `docs/rl.md`) also carry the behaviour log-probs `behav_logp`, and the two policy terms
are multiplied by the truncated importance weight `min(exp(old_logp - behav_logp), is_cap)`
(decoupled PPO: arXiv 2110.00641, as AReaL, arXiv 2505.24298): `old_logp` is then the
proximal policy (the weights the update starts from), which the clip is centred on. For a flat batch, a token of trajectory k has
`adv_pos = w_k * max(A_k, 0)`, `adv_neg = w_k * min(A_k, 0)`, `kl_weight = w_k`, where `w_k`
is the aggregation weight of the loss mode (below). A token shared by several trajectories
(a prefix-tree node) has one context, hence one ratio, and carries the sums of those terms
over its trajectories — the packed loss then equals the unrolled loss exactly.

The rewrite of PPO's `min(r A, clip(r) A)`: for A > 0 it is `A min(r, 1 + eps_high)`, for
A < 0 it is `A max(r, 1 - eps_low)`; verl's dual clip bounds the A < 0 term by `A c`.
Sources: GRPO (arXiv 2402.03300), DAPO (arXiv 2503.14476), Dr. GRPO (arXiv 2503.20783),
and the published loss code of verl (`core_algos.py`), TRL and Tunix (docs/spec.md §5.5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm", "dr-grpo")
NORM_MODES = ("seq-mean-token-sum-norm", "dr-grpo")  # divide by the constant L_max
KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Knobs of the clipped policy objective. Defaults: GRPO with verl's k3 KL off."""

  eps_low: float = 0.2
  eps_high: float = 0.2  # DAPO clip-higher: 0.28
  dual_clip: float = 0.0  # verl clip_ratio_c (e.g. 3.0); 0 disables
  beta: float = 0.0  # KL coefficient against the reference policy
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  loss_agg_mode: str = "seq-mean-token-mean"
  max_response_length: int = 0  # L_max, the constant of seq-mean-token-sum-norm / dr-grpo
  log_ratio_clamp: float = 20.0  # verl clamps logp - old_logp to ±20 before exp
  is_cap: float = 2.0  # off-policy batches: importance weight π_prox/π_behav capped here

  def __post_init__(self):
    if self.loss_agg_mode not in LOSS_AGG_MODES:
      raise ValueError(f"loss_agg_mode {self.loss_agg_mode!r} not in {LOSS_AGG_MODES}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"kl_estimator {self.kl_estimator!r} not in {KL_ESTIMATORS}")
    if self.loss_agg_mode in NORM_MODES and self.max_response_length <= 0:
      raise ValueError(f"{self.loss_agg_mode} needs max_response_length > 0")
    if self.dual_clip and self.dual_clip <= 1.0:
      raise ValueError(f"dual_clip must be > 1 (or 0 = off), got {self.dual_clip}")
    if self.is_cap < 1.0:
      raise ValueError(f"is_cap must be >= 1, got {self.is_cap}")


# ----------------------------------------------------------------------------- advantages


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, *, estimator: str = "grpo",
                     eps: float = 1e-6) -> np.ndarray:
  """Outcome advantages per trajectory, normalised within its prompt group.

  grpo: (r - mean_g) / (std_g + eps) with the unbiased (N-1) std, as verl/TRL/Tunix do; a
  group of one gets advantage 0. drgrpo: r - mean_g (no std division).
  """
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"advantage estimator {estimator!r} not in {ADVANTAGE_ESTIMATORS}")
  rewards = np.asarray(rewards, np.float64)
  group_ids = np.asarray(group_ids)
  if rewards.shape != group_ids.shape:
    raise ValueError(f"rewards {rewards.shape} and group_ids {group_ids.shape} differ in shape")
  adv = np.zeros_like(rewards)
  for g in np.unique(group_ids):
    idx = np.flatnonzero(group_ids == g)
    if len(idx) == 1:
      continue
    centred = rewards[idx] - rewards[idx].mean()
    adv[idx] = centred / (rewards[idx].std(ddof=1) + eps) if estimator == "grpo" else centred
  return adv


def trajectory_weights(lengths: np.ndarray, cfg: ObjectiveConfig,
                       num_trajectories: int | None = None) -> np.ndarray:
  """The aggregation weight w_k of every token of trajectory k (before the advantage).

  token-mean: 1 / Σ_k |o_k|; seq-mean-token-mean: 1 / (B |o_k|); seq-mean-token-sum: 1 / B;
  seq-mean-token-sum-norm: 1 / L_max, as verl's `agg_loss` (Σ of sequence sums over the
  padded response length, no division by B; docs/spec.md §5.5); dr-grpo: 1 / (B L_max), TRL's
  `loss_type="dr_grpo"`. `num_trajectories` (default len(lengths)) is B, so micro-batches
  of one batch can share the batch's normaliser. lengths: [B]; returns [B].
  """
  lengths = np.asarray(lengths, np.float64)
  count = len(lengths) if num_trajectories is None else num_trajectories
  mode = cfg.loss_agg_mode
  if mode == "token-mean":
    return np.full_like(lengths, 1.0 / max(lengths.sum(), 1.0))
  if mode == "seq-mean-token-mean":
    return 1.0 / (count * np.maximum(lengths, 1.0))
  if mode == "seq-mean-token-sum":
    return np.full_like(lengths, 1.0 / count)
  if mode == "seq-mean-token-sum-norm":
    return np.full_like(lengths, 1.0 / cfg.max_response_length)
  return np.full_like(lengths, 1.0 / (count * cfg.max_response_length))


def overlong_penalty(lengths: np.ndarray, max_length: int, buffer: int,
                     factor: float = 1.0) -> np.ndarray:
  """DAPO soft overlong punishment added to the task reward (0 within L_max - buffer)."""
  lengths = np.asarray(lengths, np.float64)
  expected = max_length - buffer
  penalty = np.minimum(-(lengths - expected) / buffer * factor, 0.0)
  return np.where(lengths > max_length, -1.0 * factor, penalty)


def informative_groups(rewards: np.ndarray, group_ids: np.ndarray) -> np.ndarray:
  """DAPO dynamic sampling: True for trajectories whose group's rewards are not all equal."""
  rewards, group_ids = np.asarray(rewards), np.asarray(group_ids)
  keep = np.zeros(len(rewards), bool)
  for g in np.unique(group_ids):
    idx = group_ids == g
    keep[idx] = np.ptp(rewards[idx]) > 0
  return keep


# ------------------------------------------------------------------------- per-token terms


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token KL(π_θ ‖ π_ref) estimators on sampled tokens (Schulman's k1/k2/k3)."""
  delta = ref_logp - logp
  if estimator == "k1":
    return -delta
  if estimator == "k2":
    return 0.5 * delta**2
  if estimator == "k3":  # verl low_var_kl: inner clamp ±20, output clamp ±10
    delta = jnp.clip(delta, -20.0, 20.0)
    return jnp.clip(jnp.exp(delta) - delta - 1.0, -10.0, 10.0)
  raise ValueError(f"kl estimator {estimator!r} not in {KL_ESTIMATORS}")


def policy_loss_terms(logp: jax.Array, old_logp: jax.Array, adv_pos: jax.Array,
                      adv_neg: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
  """Per-token clipped surrogate loss (to minimise), already weighted by adv_pos/adv_neg."""
  log_ratio = jnp.clip(logp - old_logp, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
  ratio = jnp.exp(log_ratio)
  neg_ratio = jnp.maximum(ratio, 1.0 - cfg.eps_low)
  if cfg.dual_clip:
    neg_ratio = jnp.minimum(neg_ratio, cfg.dual_clip)
  return -(adv_pos * jnp.minimum(ratio, 1.0 + cfg.eps_high) + adv_neg * neg_ratio)


def importance_weights(old_logp: jax.Array, behav_logp: jax.Array, cap: float) -> jax.Array:
  """Truncated π_prox / π_behav per token (a constant of the update: no gradient)."""
  log_w = jnp.clip(old_logp - behav_logp, -20.0, 20.0)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w), cap))


def token_objective(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                    entropy: jax.Array | None, adv_pos: jax.Array, adv_neg: jax.Array,
                    kl_weight: jax.Array, cfg: ObjectiveConfig,
                    behav_logp: jax.Array | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Σ over tokens of the full objective (policy + β KL − entropy bonus). Arrays [...].

  behav_logp: the sampling log-probs of an off-policy batch (old_logp then being the
  proximal ones); None for an on-policy batch (behaviour = proximal, weight 1).
  """
  policy = policy_loss_terms(logp, old_logp, adv_pos, adv_neg, cfg)
  metrics = {}
  if behav_logp is not None:
    weights = importance_weights(old_logp, behav_logp, cfg.is_cap)
    policy = policy * weights
    active = (kl_weight > 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(active), 1.0)
    metrics["is_weight_mean"] = jnp.sum(weights * active) / count
    metrics["is_capped_fraction"] = jnp.sum((weights >= cfg.is_cap) * active) / count
  loss = jnp.sum(policy)
  metrics["policy_loss"] = loss
  if cfg.beta and ref_logp is not None:
    kl = jnp.sum(kl_weight * kl_estimate(logp, ref_logp, cfg.kl_estimator))
    loss = loss + cfg.beta * kl
    metrics["kl"] = kl
  if cfg.entropy_coef and entropy is not None:
    ent = jnp.sum(kl_weight * entropy)
    loss = loss - cfg.entropy_coef * ent
    metrics["entropy"] = ent
  ratio = jnp.exp(logp - old_logp)
  clipped = ((adv_pos > 0) & (ratio > 1 + cfg.eps_high)) | ((adv_neg < 0) &
                                                             (ratio < 1 - cfg.eps_low))
  active = (kl_weight > 0).astype(jnp.float32)
  metrics["clip_fraction"] = jnp.sum(clipped * active) / jnp.maximum(jnp.sum(active), 1.0)
  return loss, metrics


def flat_token_weights(advantages: np.ndarray, response_mask: np.ndarray,
                       cfg: ObjectiveConfig, num_trajectories: int | None = None
                       ) -> dict[str, np.ndarray]:
  """adv_pos / adv_neg / kl_weight [N, T] for N unrolled trajectories (one per row).

  advantages: [N] per trajectory, or [N, T] per token (Step-SRPO's segment advantages).
  response_mask: [N, T] 1 on the response tokens the loss covers.
  """
  mask = np.asarray(response_mask, np.float64)
  w = trajectory_weights(mask.sum(axis=1), cfg, num_trajectories)[:, None] * mask
  adv = np.asarray(advantages, np.float64)
  adv = adv[:, None] if adv.ndim == 1 else adv
  return {"adv_pos": (w * np.maximum(adv, 0.0)).astype(np.float32),
          "adv_neg": (w * np.minimum(adv, 0.0)).astype(np.float32),
          "kl_weight": w.astype(np.float32)}
