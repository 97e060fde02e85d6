"""Sharded training equals single-device training; checkpoints move between mesh shapes."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.model import get_preset
from kat_jax.train.state import init_sharded_state
from kat_jax.parallel import (batch_sharding, global_batch, make_mesh,
                              replicated, sharding_context)
from kat_jax.parallel.mesh import resolve_mesh_shape
from kat_jax.testing import assert_trees_close, relative_error
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.step import make_train_step

OPTIM = ConfigDict(dict(lr=3e-3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9,
                        b2=0.95, eps=1e-8, clip_norm=1.0))


def _batch(rng, batch=8, length=12):
  tokens = rng.integers(0, 500, (batch, length)).astype(np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  weights = np.ones((batch, length), np.float32)
  weights[:, 0] = 0
  return dict(tokens=tokens, positions=positions,
              kv_end=np.full((batch, length), length, np.int32),
              pred_index=np.maximum(positions - 1, 0).astype(np.int32), weights=weights)


def _train(mesh, steps=3, config=None):
  config = config or get_preset("tiny", num_layers=2, num_heads=4, num_kv_heads=4)
  optimizer = make_optimizer(OPTIM, total_steps=10)
  rng = np.random.default_rng(0)
  with sharding_context(mesh):
    state, shardings = init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    step = jax.jit(make_train_step(config, optimizer), in_shardings=(shardings,
                   batch_sharding(mesh)), out_shardings=(shardings, replicated(mesh)))
    losses = []
    for _ in range(steps):
      state, metrics = step(state, global_batch(_batch(rng), mesh))
      losses.append(float(metrics["loss"]))
  return state, losses


@pytest.fixture(scope="module")
def single_device_run():
  return _train(make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2", "fsdp2-tensor4"])
def test_sharded_step_equals_single_device(single_device_run, shape):
  assert jax.device_count() == 8
  ref_state, ref_losses = single_device_run
  state, losses = _train(make_mesh(*shape))
  assert relative_error(losses, ref_losses) < 1e-5
  params, ref_params = jax.device_get(state.params), jax.device_get(ref_state.params)
  # The key bias shifts every logit of a query row equally, so softmax ignores it: its true
  # gradient is 0 and Adam's normalisation turns rounding noise into lr-sized steps there.
  for tree in (params, ref_params):
    del tree["layers"]["attn"]["k_bias"]
  assert_trees_close(params, ref_params, rtol=1e-5)


def test_params_are_actually_sharded():
  mesh = make_mesh(1, 2, 4)
  config = get_preset("tiny", num_layers=2, num_heads=4, num_kv_heads=4)
  with sharding_context(mesh):
    state, _ = init_sharded_state(config, make_optimizer(OPTIM, 10), mesh, jax.random.key(0))
  q = state.params["layers"]["attn"]["q_kernel"]  # [L, d, H, D]: embed over fsdp, heads over tensor
  assert q.addressable_shards[0].data.shape == (2, 64, 1, 32)
  mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate_proj"]
  assert tuple(mu.sharding.spec) == (None, "fsdp", "tensor")  # Adam moments shard like params


def test_indivisible_dimension_is_replicated_not_an_error():
  mesh = make_mesh(2, 1, 4)
  config = get_preset("tiny", num_layers=2)  # 2 KV heads cannot split 4 ways
  with sharding_context(mesh):
    state, shardings = init_sharded_state(config, make_optimizer(OPTIM, 10), mesh,
                                          jax.random.key(0))
  assert shardings.params["layers"]["attn"]["k_kernel"].spec[2] is None
  assert shardings.params["layers"]["attn"]["q_kernel"].spec[2] == "tensor"


def test_mesh_shape_resolution_and_errors():
  assert resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
  assert resolve_mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    resolve_mesh_shape(-1, -1, 1, 8)
  with pytest.raises(ValueError, match="does not fit 8 devices"):
    resolve_mesh_shape(3, 1, 1, 8)
  with pytest.raises(ValueError, match="there are 8 devices"):
    resolve_mesh_shape(2, 2, 1, 8)


def test_checkpoint_saved_on_8_devices_restores_on_4(tmp_path):
  config = get_preset("tiny", num_layers=2, num_heads=4, num_kv_heads=4)
  optimizer = make_optimizer(OPTIM, 10)
  state8, _ = _train(make_mesh(2, 2, 2), steps=1, config=config)
  checkpointer = RunCheckpointer(str(tmp_path / "ckpt"), save_every=1, async_save=True)
  checkpointer.save(1, state8, None, {"note": "8 devices"}, force=True)
  checkpointer.wait()

  mesh4 = make_mesh(1, 2, 2, devices=jax.devices()[:4])
  with sharding_context(mesh4):
    target, _ = init_sharded_state(config, optimizer, mesh4, jax.random.key(1))
    restored, meta = checkpointer.restore(target, None)
  checkpointer.close()
  assert meta == {"note": "8 devices"}
  assert int(restored.step) == 1
  leaf = restored.params["layers"]["mlp"]["up_proj"]
  assert set(leaf.sharding.device_set) == set(jax.devices()[:4])
  assert_trees_close(jax.device_get(restored), jax.device_get(state8), rtol=1e-12)
