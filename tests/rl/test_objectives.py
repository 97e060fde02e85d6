"""GRPO-family objectives: hand-computed values and the verl/TRL formulas they restate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel
from kat_jax.rl import objectives as obj
from kat_jax.train.losses import chunked_token_logprobs


def test_grpo_and_drgrpo_advantages_by_hand():
  rewards = np.array([1.0, 0.0, 1.0, 1.0, 5.0])
  groups = np.array([0, 0, 0, 0, 1])  # group 1 has a single rollout -> advantage 0
  std = np.std([1, 0, 1, 1], ddof=1)  # 0.5 (unbiased, as verl/TRL/Tunix)
  np.testing.assert_allclose(obj.group_advantages(rewards, groups, eps=0.0),
                             [0.25 / std, -0.75 / std, 0.25 / std, 0.25 / std, 0.0])
  np.testing.assert_allclose(obj.group_advantages(rewards, groups, estimator="drgrpo"),
                             [0.25, -0.75, 0.25, 0.25, 0.0])
  with pytest.raises(ValueError, match="advantage estimator 'ppo'"):
    obj.group_advantages(rewards, groups, estimator="ppo")


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", [1 / 6, 1 / 6]),
    ("seq-mean-token-mean", [1 / 4, 1 / 8]),
    ("seq-mean-token-sum", [1 / 2, 1 / 2]),
    ("seq-mean-token-sum-norm", [1 / 8, 1 / 8]),  # verl: no division by B
    ("dr-grpo", [1 / 16, 1 / 16]),  # TRL dr_grpo: divided by B too
])
def test_aggregation_weights(mode, expected):
  cfg = obj.ObjectiveConfig(loss_agg_mode=mode, max_response_length=8)
  np.testing.assert_allclose(obj.trajectory_weights(np.array([2, 4]), cfg), expected)


def test_clipped_terms_by_hand():
  cfg = obj.ObjectiveConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0)
  logp = jnp.log(jnp.array([1.5, 0.5, 5.0, 1.1]))  # ratios against old_logp = 0
  old = jnp.zeros(4)
  adv_pos = jnp.array([1.0, 0.0, 0.0, 2.0])
  adv_neg = jnp.array([0.0, -1.0, -1.0, 0.0])
  terms = obj.policy_loss_terms(logp, old, adv_pos, adv_neg, cfg)
  # A>0, r=1.5 -> clipped at 1.28; A<0, r=0.5 -> floor 0.8; A<0, r=5 -> dual clip 3; r=1.1 free
  np.testing.assert_allclose(terms, [-1.28, 0.8, 3.0, -2.2], rtol=1e-6)


def test_kl_estimators_by_hand():
  logp, ref = jnp.array([-1.0]), jnp.array([-1.5])
  d = -0.5  # ref - logp
  np.testing.assert_allclose(obj.kl_estimate(logp, ref, "k1"), [0.5])
  np.testing.assert_allclose(obj.kl_estimate(logp, ref, "k2"), [0.125])
  np.testing.assert_allclose(obj.kl_estimate(logp, ref, "k3"), [np.exp(d) - d - 1], rtol=1e-6)


def test_overlong_penalty_and_dynamic_sampling():
  np.testing.assert_allclose(obj.overlong_penalty(np.array([10, 16, 18, 20, 21]), 20, 4),
                             [0.0, 0.0, -0.5, -1.0, -1.0])
  keep = obj.informative_groups(np.array([1, 1, 0, 1, 0, 0]), np.array([0, 0, 1, 1, 2, 2]))
  np.testing.assert_array_equal(keep, [False, False, True, True, False, False])


def _reference_loss(logp, old, ref, adv, mask, cfg):
  """Independent numpy restatement of verl's vanilla policy loss + `agg_loss` + KL loss
  (docs/spec.md §5.5); the `dr-grpo` mode restates TRL's `loss_type="dr_grpo"` instead."""
  ratio = np.exp(logp - old)
  pg = np.maximum(-adv[:, None] * ratio,
                  -adv[:, None] * np.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high))
  if cfg.dual_clip:
    pg = np.where(adv[:, None] < 0, np.minimum(pg, -adv[:, None] * cfg.dual_clip), pg)
  d = ref - logp
  kl = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}[cfg.kl_estimator]
  per_token = pg + cfg.beta * kl
  mode = cfg.loss_agg_mode
  if mode == "token-mean":
    return (per_token * mask).sum() / mask.sum()
  per_seq = (per_token * mask).sum(1)
  if mode == "seq-mean-token-mean":
    return (per_seq / mask.sum(1)).mean()
  if mode == "seq-mean-token-sum":
    return per_seq.mean()
  if mode == "seq-mean-token-sum-norm":  # verl: sum(seq_losses) / loss_mask.shape[-1]
    return per_seq.sum() / cfg.max_response_length
  # TRL dr_grpo: (per_token_loss * mask).sum() / (batch size * max_completion_length)
  return (per_token * mask).sum() / (len(mask) * cfg.max_response_length)


@pytest.mark.parametrize("mode", obj.LOSS_AGG_MODES)
@pytest.mark.parametrize("kl", obj.KL_ESTIMATORS)
def test_flat_objective_equals_published_formulas(mode, kl):
  rng = np.random.default_rng(0)
  n, t = 6, 9
  cfg = obj.ObjectiveConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.04,
                            kl_estimator=kl, loss_agg_mode=mode, max_response_length=12)
  logp = rng.normal(-1.0, 0.5, (n, t))
  old = logp + rng.normal(0, 0.4, (n, t))
  ref = logp + rng.normal(0, 0.3, (n, t))
  adv = rng.normal(size=n)
  mask = (rng.random((n, t)) < 0.8).astype(np.float64)
  mask[:, 0] = 1
  w = obj.flat_token_weights(adv, mask, cfg)
  loss, _ = obj.token_objective(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), None,
                                jnp.asarray(w["adv_pos"]), jnp.asarray(w["adv_neg"]),
                                jnp.asarray(w["kl_weight"]), cfg)
  np.testing.assert_allclose(float(loss), _reference_loss(logp, old, ref, adv, mask, cfg),
                             rtol=2e-5)


def test_chunked_token_logprobs_match_full_softmax():
  config = get_preset("tiny", num_layers=2)
  params = init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 500)
  pred_index = jnp.maximum(jnp.arange(9) - 1, 0)[None].repeat(2, 0)
  model = Decoder(config)

  @jax.jit  # one compile instead of op-by-op dispatch of the forwards
  def outputs(params):
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    logp, entropy = chunked_token_logprobs(hidden, lm_head_kernel(params, config), tokens,
                                           pred_index, chunk_size=5, with_entropy=True)
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1)
    gathered = jnp.take_along_axis(log_probs, pred_index[..., None], axis=1)
    # tempered: softmax(logits / T), the distribution a sampler at temperature T draws from
    hot, _ = chunked_token_logprobs(hidden, lm_head_kernel(params, config), tokens, pred_index,
                                    chunk_size=5, temperature=0.7)
    tempered = jax.nn.log_softmax(model.apply({"params": params}, tokens) / 0.7, axis=-1)
    tempered = jnp.take_along_axis(tempered, pred_index[..., None], axis=1)
    return logp, entropy, gathered, hot, tempered

  logp, entropy, gathered, hot, tempered = outputs(params)
  np.testing.assert_allclose(logp, jnp.take_along_axis(gathered, tokens[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(entropy, -jnp.sum(jnp.exp(gathered) * gathered, -1), rtol=1e-5)
  np.testing.assert_allclose(hot, jnp.take_along_axis(tempered, tokens[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-6)


def test_config_errors():
  with pytest.raises(ValueError, match="loss_agg_mode 'mean'"):
    obj.ObjectiveConfig(loss_agg_mode="mean")
  for mode in obj.NORM_MODES:
    with pytest.raises(ValueError, match=f"{mode} needs max_response_length"):
      obj.ObjectiveConfig(loss_agg_mode=mode)
  with pytest.raises(ValueError, match="dual_clip"):
    obj.ObjectiveConfig(dual_clip=0.5)


def test_off_policy_batch_weights_each_token_by_the_capped_proximal_over_behaviour_ratio():
  # By hand (eps 0.2, cap 2): token 0 has r = .5/.4 = 1.25 -> clipped to 1.2, weight
  # min(.4/.1, 2) = 2 -> -1 * 1.2 * 2 = -2.4 (no gradient: clipped); token 1 has r = 1,
  # weight .3/.6 = .5 -> +2 * 1 * .5 = 1.0, d/dlogp = 2 * r * .5 = 1.0.
  cfg = obj.ObjectiveConfig(eps_low=0.2, eps_high=0.2, is_cap=2.0)
  logp = jnp.log(jnp.array([0.5, 0.3]))
  old, behav = jnp.log(jnp.array([0.4, 0.3])), jnp.log(jnp.array([0.1, 0.6]))
  adv_pos, adv_neg = jnp.array([1.0, 0.0]), jnp.array([0.0, -2.0])
  kl_weight = jnp.ones(2)

  def loss(lp):
    return obj.token_objective(lp, old, None, None, adv_pos, adv_neg, kl_weight, cfg, behav)

  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logp)
  np.testing.assert_allclose(value, -1.4, rtol=1e-6)
  np.testing.assert_allclose(grad, [0.0, 1.0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics["is_weight_mean"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["is_capped_fraction"], 0.5, rtol=1e-6)
  # Without behaviour log-probs (on-policy) the same tokens give the plain clipped loss.
  on_policy, _ = obj.token_objective(logp, old, None, None, adv_pos, adv_neg, kl_weight, cfg)
  np.testing.assert_allclose(on_policy, -1.2 + 2.0, rtol=1e-6)
