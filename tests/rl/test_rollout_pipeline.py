"""The rollout pipeline: bounded staleness, weight pushes, split devices, and the Step-SRPO stage
on it (on-policy reproduction of the synchronous loop, k = 1 on a split mesh, kill and resume)."""

import concurrent.futures
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.step_srpo import get_config as step_srpo_config
from kat_jax.errors import ConfigError
from kat_jax.model import get_preset, init_params
from kat_jax.rl import rollouts as rollouts_lib
from kat_jax.rl import stage as stage_lib
from kat_jax.rl.pipeline import (RolloutPipeline, RolloutWeights, decode_weights_fn,
                                 rollout_meshes, split_devices)
from kat_jax.sampling import prepare_params
from kat_jax.tasks.rewards import RewardPool, RewardResult
from kat_jax.testing import assert_reproduces_synchronous_loop

RECORD = os.path.join(os.path.dirname(__file__), "data", "synchronous_loop_record.json")


# ----------------------------------------------------------------------------- the pipeline


def _producer(log):
  def produce(index, weights):
    log.append((index, weights.current()[1]))
    return index
  return produce


def test_on_policy_pipeline_produces_each_batch_inline_with_that_steps_weights():
  log = []
  pipeline = RolloutPipeline(_producer(log), RolloutWeights(lambda p: p), max_staleness=0)
  pipeline.start("w0", 0)
  for step in range(3):
    produced, _ = pipeline.take(step, f"w{step}")
    assert produced.value == step
    assert pipeline.weights.current() == (f"w{step}", step)
    pipeline.trained(f"w{step + 1}", step + 1)
  assert log == [(0, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize("k", [1, 2])
def test_rollouts_overlap_the_update_and_start_at_most_k_versions_behind(k):
  log, started = [], {}
  lock = threading.Lock()

  def produce(index, weights):
    with lock:
      log.append((index, weights.current()[1]))
      started.setdefault(index, threading.Event()).set()
    return index

  pipeline = RolloutPipeline(produce, RolloutWeights(lambda p: p), max_staleness=k,
                             timeout_s=30)
  pipeline.start("w0", 0)
  try:
    for step in range(5):
      produced, _ = pipeline.take(step, None)
      assert produced.value == step
      # "Training" step `step` waits for batch step + 1 to start: it must not need this update.
      with lock:
        event = started.setdefault(step + 1, threading.Event())
      assert event.wait(timeout=30), f"batch {step + 1} did not start during update {step}"
      pipeline.trained(f"w{step + 1}", step + 1)
  finally:
    pipeline.close()
  assert [i for i, _ in log][:6] == list(range(6))
  assert all(version >= index - k for index, version in log), log
  assert any(version < index for index, version in log), "no batch ran ahead of the trainer"


def test_a_failing_producer_surfaces_its_error_in_take():
  def produce(index, weights):
    raise RuntimeError(f"rollout {index} broke")

  pipeline = RolloutPipeline(produce, RolloutWeights(lambda p: p), max_staleness=1,
                             timeout_s=30)
  pipeline.start("w0", 0)
  with pytest.raises(RuntimeError, match="rollout 0 broke"):
    pipeline.take(0, None)
  pipeline.close()


def test_weights_never_go_back_a_version():
  weights = RolloutWeights(lambda p: p)
  weights.push("a", 3)
  with pytest.raises(ValueError, match="out of order"):
    weights.push("b", 2)


def test_split_devices_gives_disjoint_train_and_rollout_devices():
  devices = jax.devices()
  assert len(devices) == 8
  train, rollout = split_devices(2, 0)
  assert train == devices[:6] and rollout == devices[6:]
  train, rollout = split_devices(3, 4)
  assert train == devices[:4] and rollout == devices[4:7]
  shared = split_devices(0, 0)
  assert shared[0] is shared[1]
  with pytest.raises(ConfigError, match="rollout_devices=6 \\+ train_devices=4"):
    split_devices(6, 4)
  with pytest.raises(ConfigError, match="train_devices needs config.rl.rollout_devices"):
    split_devices(0, 2)
  with pytest.raises(ConfigError, match=">= 0"):
    split_devices(-1, 0)


def test_decode_weights_move_to_the_rollout_mesh_with_the_same_values():
  config = get_preset("tiny")
  params = init_params(config, jax.random.key(0))
  config_dict = step_srpo_config()
  train_mesh, rollout_mesh = rollout_meshes(config_dict, 2, 0, 2)
  assert rollout_mesh.shape["tensor"] == 2 and train_mesh.size == 6
  placed = jax.device_put(params, jax.sharding.NamedSharding(train_mesh,
                                                              jax.sharding.PartitionSpec()))
  moved = decode_weights_fn(config, train_mesh, rollout_mesh, own_copy=False)(placed)
  expected = prepare_params(params, config)
  rollout_devices = set(rollout_mesh.devices.flat)
  for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(expected)):
    assert set(got.devices()) <= rollout_devices
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_weights_on_shared_devices_do_not_alias_the_training_params():
  config = get_preset("tiny")
  params = init_params(config, jax.random.key(0))
  mesh, _ = rollout_meshes(step_srpo_config(), 0, 0, 1)
  placed = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  dparams = decode_weights_fn(config, mesh, mesh, own_copy=True)(placed)
  training = {x.addressable_shards[0].data.unsafe_buffer_pointer()
              for x in jax.tree.leaves(placed)}
  decode = {x.addressable_shards[0].data.unsafe_buffer_pointer()
            for x in jax.tree.leaves(dparams)}
  assert not training & decode


def test_partial_rollouts_keep_each_tokens_version_across_two_pushes_into_the_packed_batch():
  """Two weight pushes land while one batch generates (after decode calls 1 and 3): the
  engine switches at the next call, every token keeps the version and log-prob it was
  sampled with, through the trajectory manager into the packed rows the update reads."""
  from kat_jax.rl.objectives import ObjectiveConfig  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.trajectories import TrajectoryManager  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.tree import unrolled_batch  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.engine import Engine, Request  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", dtype="float32", param_dtype="float32")
  dparams = [prepare_params(init_params(config, jax.random.key(i)), config) for i in range(3)]
  weights = RolloutWeights(lambda p: p)
  weights.push(dparams[0], 0)
  engine = Engine(config, dparams[0], num_slots=4, num_pages=64, page_size=4, steps_per_call=3,
                  prefill_chunk=16)
  weights.attach(engine)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (5, 7)]
  ids = [engine.submit(Request(p, 14, sampling=SamplingParams(1.0), num_samples=3,
                               rng=jax.random.key(i))) for i, p in enumerate(prompts)]

  def push(_):
    calls = engine.stats["decode_calls"]
    if calls in (1, 3) and weights.current()[1] != (calls + 1) // 2:
      weights.push(dparams[(calls + 1) // 2], (calls + 1) // 2)

  done = engine.run(push)
  manager, groups = TrajectoryManager(), []
  for prompt, sample_ids in zip(prompts, ids):
    group = manager.new_group()
    for sid in sample_ids:
      manager.record(group, prompt, done[sid].tokens, done[sid].logprobs, done[sid].versions)
    groups.append(group)
  versions = np.concatenate([done[s].versions for sample_ids in ids for s in sample_ids])
  assert set(versions.tolist()) == {0, 1, 2}
  assert all(np.all(np.diff(done[s].versions) >= 0) for sample_ids in ids for s in sample_ids)
  batch = unrolled_batch([[t.to_trajectory(1.0) for t in manager.trajectories(g)]
                          for g in groups], ObjectiveConfig(), 32, 0)
  row = 0
  for prompt, group, sample_ids in zip(prompts, groups, ids):
    for t, sid in zip(manager.trajectories(group), sample_ids):
      span = slice(len(prompt), len(prompt) + len(done[sid].tokens))
      np.testing.assert_array_equal(t.versions[span], done[sid].versions)
      np.testing.assert_array_equal(batch["old_logp"][row, span], done[sid].logprobs)
      row += 1


# ----------------------------------------------------------------------------- the stage


class ParityRewards(RewardPool):
  """Reward = parity of the response's length: a deterministic signal from a random model."""

  def score_async(self, items):
    future = concurrent.futures.Future()
    future.set_result([RewardResult(float(len(i["response"]) % 2), "ok", "math")
                       for i in items])
    return future


def _run_step_srpo(workdir, steps=3, **rl):
  config = step_srpo_config()
  config.workdir = str(workdir)
  config.model.num_layers = 1
  config.rl.update(steps=steps, prompts_per_step=2, group_size=2, max_new_tokens=16,
                   eval_prompts=1, stage1_mix="math:1", stage2_mix="math:1", **rl)
  config.train.update(tensorboard=False, log_every=1, checkpoint_every=100)
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _curves(workdir):
  with open(os.path.join(workdir, "rl_curves.json"), encoding="utf-8") as f:
    return json.load(f)["history"]


def test_on_policy_step_srpo_reproduces_the_recorded_synchronous_loop(tmp_path, monkeypatch):
  # The loop packed one row per sample (the only packing it had): pack="unrolled".
  monkeypatch.setattr(stage_lib, "RewardPool", ParityRewards)
  config = _run_step_srpo(tmp_path / "k0", max_staleness=0, pack="unrolled")
  stage_lib.run_step_srpo(config)
  with open(RECORD, encoding="utf-8") as f:
    record = json.load(f)["step_srpo"]
  assert_reproduces_synchronous_loop(_metrics(config.workdir), record)
  assert all(h["staleness"] == 0 for h in _curves(config.workdir))
  # Tree packing (each group's prompt once) takes the same updates, up to float rounding.
  tree = _run_step_srpo(tmp_path / "tree", max_staleness=0, pack="tree")
  stage_lib.run_step_srpo(tree)
  tree_rows = _metrics(tree.workdir)
  np.testing.assert_allclose([r["grad_norm"] for r in tree_rows],
                             [r["grad_norm"] for r in record], rtol=1e-5)
  np.testing.assert_allclose(tree_rows[0]["loss"], record[0]["loss"], rtol=1e-5)
  assert [r["reward"] for r in tree_rows] == [r["reward"] for r in record]


def test_one_step_stale_step_srpo_on_a_split_mesh_trains_on_recorded_behaviour_logprobs(
    tmp_path, monkeypatch):
  monkeypatch.setattr(stage_lib, "RewardPool", ParityRewards)
  seen = []
  real_next = rollouts_lib.StepSRPORollouts.next

  def spy(self, state, step):
    work = real_next(self, state, step)
    seen.append((work.batch, self._last["sampled"], self._last["keep"]))
    return work

  monkeypatch.setattr(rollouts_lib.StepSRPORollouts, "next", spy)
  # One row per sample, so each sample's tokens sit at known positions of its row.
  config = _run_step_srpo(tmp_path / "k1", steps=3, max_staleness=1, rollout_devices=2,
                          rollout_tensor=2, pack="unrolled")
  stage_lib.run_step_srpo(config)
  curves = _curves(config.workdir)
  assert [h["step"] for h in curves] == [1, 2, 3]
  assert all(0 <= h["staleness"] <= 1 for h in curves)
  metrics = _metrics(config.workdir)
  assert all("is_weight_mean" in row for row in metrics)
  # Batch 0 was sampled with the weights it trains from: its behaviour log-probs (tempered
  # like the loss) equal the proximal ones, so every importance weight is 1.
  assert abs(metrics[0]["is_weight_mean"] - 1.0) < 1e-4 and metrics[0]["is_capped_fraction"] == 0
  # The batch's behaviour log-probs are the ones the engine recorded while sampling, token by
  # token; it has no old_logp: one update per batch takes the proximal log-probs from its own
  # forward pass (rl.policy_step).
  for batch, sampled, keep in seen:
    assert "old_logp" not in batch
    behav = np.asarray(batch["behav_logp"])
    weights = np.asarray(batch["kl_weight"])
    row = 0
    for i in keep:
      prompt = sampled["prompts"][i]
      for sample in sampled["groups"][i]:
        start = len(prompt) + sample.prefill
        np.testing.assert_array_equal(behav[row, start:start + len(sample.logprobs)],
                                      sample.logprobs)
        assert np.all(weights[row, start:start + len(sample.logprobs)] > 0)
        assert sample.versions.shape == sample.logprobs.shape
        row += 1


def test_one_step_stale_step_srpo_killed_after_a_checkpoint_resumes_and_redraws_the_same_prompts(
    tmp_path, monkeypatch):
  from kat_jax.testing import SimulatedKill, killed_before_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(stage_lib, "RewardPool", ParityRewards)

  def config_for(name):
    config = _run_step_srpo(tmp_path / name, steps=4, max_staleness=1,
                            history_resampling=False)
    config.train.update(checkpoint_every=2, async_checkpoint=False)
    return config

  stage_lib.run_step_srpo(config_for("reference"))
  killed = config_for("killed")
  with killed_before_step(4):
    with pytest.raises(SimulatedKill):
      stage_lib.run_step_srpo(killed)
  stage_lib.run_step_srpo(killed)
  reference, resumed = _curves(tmp_path / "reference"), _curves(killed.workdir)
  assert [h["step"] for h in resumed] == [1, 2, 3, 4]
  assert [h["prompt_ids"] for h in resumed] == [h["prompt_ids"] for h in reference]
  steps_logged = [row["step"] for row in _metrics(killed.workdir)]
  assert steps_logged == [1, 2, 3, 4]


@pytest.mark.parametrize("field, value, match", [
    ("max_staleness", -1, "max_staleness must be >= 0"),
    ("rollout_tensor", 0, "rollout_tensor must be >= 1"),
    ("pack", "flat", "config.rl.pack must be one of \\['tree', 'unrolled'\\], got 'flat'"),
    ("rollout_devices", 9, "do not fit the 8 devices"),
])
def test_bad_pipeline_fields_are_config_errors(tmp_path, field, value, match):
  config = _run_step_srpo(tmp_path / "bad", **{field: value})
  with pytest.raises(ConfigError, match=match):
    stage_lib.run_step_srpo(config)
