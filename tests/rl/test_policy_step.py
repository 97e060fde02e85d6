"""Several policy updates on one rollout batch: the behaviour log-probs stay those of the
rollout policy, so later updates see ratios != 1 and the clip engages."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kat_jax.rl.tree import Trajectory, unrolled_batch
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import ObjectiveConfig, token_objective
from kat_jax.rl.policy_step import make_logprob_fn, make_policy_step
from kat_jax.train.state import create_train_state


def _batch(cfg: ObjectiveConfig) -> dict[str, np.ndarray]:
  """4 trajectories of 10 tokens (4 prompt + 6 response) with advantages ±1, [4, 16]."""
  rng = np.random.default_rng(0)
  mask = np.array([0] * 4 + [1] * 6)
  groups = [[Trajectory(rng.integers(0, 500, 10), mask, adv) for adv in (1.0, -1.0)]
            for _ in range(2)]
  batch = unrolled_batch(groups, cfg, 16, pad_id=0)
  return {k: v for k, v in batch.items() if k != "visits"}


def test_updates_per_batch_keep_old_logprobs():
  config = get_preset("tiny", num_layers=1)
  cfg = ObjectiveConfig(eps_low=0.05, eps_high=0.05)
  optimizer = optax.sgd(5.0)  # large steps, so the second update's ratios leave the clip range
  state = create_train_state(init_params(config, jax.random.key(0)), optimizer)
  logprob_fn = jax.jit(make_logprob_fn(config, loss_chunk=64))
  step = jax.jit(make_policy_step(config, optimizer, cfg, loss_chunk=64))
  batch = _batch(cfg)
  batch["old_logp"] = np.asarray(logprob_fn(state.params, batch))  # rollout policy, once
  state, first = step(state, batch)
  assert float(first["clip_fraction"]) == 0.0  # ratio 1 on the first update
  logp = logprob_fn(state.params, batch)  # the policy after one update
  args = (jnp.asarray(batch["adv_pos"]), jnp.asarray(batch["adv_neg"]),
          jnp.asarray(batch["kl_weight"]), cfg)
  expected, expected_metrics = token_objective(logp, jnp.asarray(batch["old_logp"]), None,
                                               None, *args)
  refreshed, _ = token_objective(logp, logp, None, None, *args)  # old log-probs recomputed
  state, second = step(state, batch)
  assert int(state.step) == 2
  np.testing.assert_allclose(float(second["loss"]), float(expected), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(second["clip_fraction"]),
                             float(expected_metrics["clip_fraction"]), atol=1e-6)
  assert float(second["clip_fraction"]) > 0.0
  assert abs(float(expected) - float(refreshed)) > 1e-3  # not the ratio-1 objective


def test_a_batch_without_old_logprobs_is_centred_on_the_weights_being_differentiated():
  """Omitting old_logp equals passing a separate forward pass's log-probs of the same
  weights: same loss, same gradient (one update needs no extra pass); with behaviour
  log-probs the importance weights are taken against that same pass."""
  from kat_jax.rl.policy_step import make_policy_loss_fn  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", num_layers=1)
  cfg = ObjectiveConfig(eps_low=0.2, eps_high=0.2, is_cap=2.0)
  params = init_params(config, jax.random.key(0))
  batch = _batch(cfg)
  batch["behav_logp"] = np.asarray(
      jax.jit(make_logprob_fn(config, loss_chunk=64))(init_params(config, jax.random.key(1)),
                                                      batch))
  grad_fn = jax.jit(jax.value_and_grad(make_policy_loss_fn(config, cfg, loss_chunk=64),
                                       has_aux=True))
  without = {k: v for k, v in batch.items() if k != "old_logp"}
  separate = dict(batch, old_logp=np.asarray(
      jax.jit(make_logprob_fn(config, loss_chunk=64))(params, batch)))
  (loss_a, metrics_a), grads_a = grad_fn(params, without)
  (loss_b, metrics_b), grads_b = grad_fn(params, separate)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  np.testing.assert_allclose(metrics_a["is_weight_mean"], metrics_b["is_weight_mean"], rtol=1e-5)
  assert abs(float(metrics_a["is_weight_mean"]) - 1.0) > 1e-3  # the weights act here
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def _accumulated_update(rows: int):
  from kat_jax.rl.policy_step import AccumulatedPolicyUpdate  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", num_layers=1)
  optimizer = optax.adamw(1e-3)
  state = create_train_state(init_params(config, jax.random.key(0)), optimizer)
  update = AccumulatedPolicyUpdate(config, optimizer, ObjectiveConfig(), rows, loss_chunk=64)
  return config, state, update


def test_accumulated_update_holds_two_gradients_while_computing_the_next_micro_batch():
  """While micro-batch i's gradient is computed, the live copies of a parameter's shape are
  the weights, AdamW's two moments and the running sum; micro-batch i-1's own gradient is
  gone (one more would be a whole f32 copy of the model: 5.75 GiB at qwen2.5-1.5b)."""
  config, state, update = _accumulated_update(rows=1)
  shape = (config.vocab_size, config.hidden_size)  # the (tied) embedding: one leaf per copy
  live = []
  grad_fn = update.grad_fn

  def count() -> int:
    gc.collect()  # arrays in garbage cycles are not live
    return sum(a.shape == shape for a in jax.live_arrays())

  def counting(params, chunk):
    live.append(count())
    return grad_fn(params, chunk)

  update.grad_fn = counting
  batch = _batch(ObjectiveConfig())  # 4 rows: 4 micro-batches of 1
  batch.pop("old_logp")
  # The weights, mu and nu, and whatever earlier tests in this process left alive.
  before = count()
  update(state, batch)
  # From the second micro-batch on also the running sum, nothing more.
  assert [n - before for n in live] == [0, 1, 1, 1]


def test_micro_batch_temp_bytes_grows_with_the_row_and_its_compile_serves_the_update():
  _, state, update = _accumulated_update(rows=2)
  batch = _batch(ObjectiveConfig())
  batch.pop("old_logp")

  def spec(length):
    return {k: jax.ShapeDtypeStruct((2, length), v.dtype) for k, v in batch.items()}

  short, long = (update.micro_batch_temp_bytes(state.params, spec(n)) for n in (16, 256))
  assert 0 < short < long
  compiles = []

  def listen(event, _, **kw):
    if event.endswith("backend_compile_duration"):
      compiles.append(kw.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    update(state, batch)  # [4, 16]: two micro-batches of the shape measured above
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles and all(compiles)  # each compile names its function
  assert "jit(loss_fn)" not in compiles  # add / apply compiled, the gradient pass reused
