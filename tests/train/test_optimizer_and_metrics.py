"""Warmup/cosine schedule values, clipping, decay mask; metrics JSONL, TensorBoard, progress line."""

import glob
import io
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.train.metrics import MetricsLogger
from kat_jax.train.optimizer import learning_rate_schedule, make_optimizer


def _optim(**changes):
  fields = dict(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, b1=0.9,
                b2=0.95, eps=1e-8, clip_norm=0.0)
  return types.SimpleNamespace(**{**fields, **changes})


def test_schedule_warms_up_then_decays_to_the_floor():
  schedule = learning_rate_schedule(_optim(), 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-3)
  assert float(schedule(10)) == pytest.approx(1e-2)
  midway = 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + np.cos(np.pi * 45 / 90))
  assert float(schedule(55)) == pytest.approx(midway, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(1e-3)
  assert all(float(schedule(s)) >= float(schedule(s + 1)) for s in range(10, 100))


def _updates(optim, grads_seq, params):
  """The last update after applying `grads_seq` one by one from a fresh state."""
  tx = make_optimizer(optim, 100)
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
  return updates


def test_clipping_scales_gradients_to_the_global_norm():
  params = {"w": jnp.ones((4,)), "b": jnp.ones((2,))}
  big = {"w": jnp.array([300.0, 400.0, 0.0, 0.0]), "b": jnp.zeros((2,))}  # global norm 500
  small = {"w": jnp.array([0.3, 0.0, 0.4, 0.0]), "b": jnp.array([0.0, 0.1])}  # norm < 1
  # Adam's first step is scale-free, so compare second steps: clipping must act like feeding
  # Adam big/500 first (and leave the small gradient alone).
  clip = _optim(clip_norm=1.0, warmup_steps=0)
  no_clip = _optim(clip_norm=0.0, warmup_steps=0)
  clipped = _updates(clip, [big, small], params)
  manual = _updates(no_clip, [jax.tree.map(lambda g: g / 500.0, big), small], params)
  unclipped = _updates(no_clip, [big, small], params)
  np.testing.assert_allclose(clipped["w"], manual["w"], rtol=1e-6)
  assert np.abs(np.asarray(clipped["w"] - unclipped["w"])).max() > 1e-4


def test_weight_decay_skips_norms_and_biases():
  params = {"attn": {"q_kernel": jnp.ones((2, 2)), "q_bias": jnp.ones((2,))},
            "input_norm": {"scale": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = _updates(_optim(weight_decay=0.5, warmup_steps=0), [zeros], params)
  assert np.all(np.asarray(updates["attn"]["q_kernel"]) < 0)  # decayed towards 0
  assert not np.any(np.asarray(updates["attn"]["q_bias"]))
  assert not np.any(np.asarray(updates["input_norm"]["scale"]))


def test_metrics_jsonl_tensorboard_and_progress_line(tmp_path):
  stream = io.StringIO()
  logger = MetricsLogger(str(tmp_path), total_steps=10, tensorboard=True, stream=stream)
  logger.write(1, {"loss": 2.5})
  logger.count_tokens(1000.0)
  logger.write(3, {"loss": 2.0, "accuracy": 0.25})
  logger.write_eval(3, {"loss": 2.2})
  logger.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (3, "train"), (3, "eval")]
  assert rows[1]["tokens_per_sec"] > 0 and rows[1]["sec_per_step"] > 0
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  lines = stream.getvalue().splitlines()
  assert lines[0] == "step 1/10 | loss 2.5000"
  assert re.fullmatch(r"step 3/10 \| loss 2\.0000 \| accuracy 0\.2500 \| [\d,]+ tok/s \| "
                      r"ETA \d\d:\d\d", lines[1]), lines[1]
  assert lines[2] == "eval @ step 3: loss 2.2000"


def test_resumed_logger_drops_rows_past_the_restored_step(tmp_path):
  # A run logged steps 1..10 (eval at 5 and 10) and was killed mid-row; it resumes from its
  # step-8 checkpoint and logs 9..12: every (step, split) appears once, the old rows up to 8 kept.
  logger = MetricsLogger(str(tmp_path), total_steps=12, tensorboard=False, stream=io.StringIO())
  for step in range(1, 11):
    logger.write(step, {"loss": 10.0 + step})
    if step % 5 == 0:
      logger.write_eval(step, {"loss": 20.0 + step})
  logger.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 11, "split": "tr')  # the row the kill cut short
  logger = MetricsLogger(str(tmp_path), total_steps=12, tensorboard=False, stream=io.StringIO(),
                         resume_step=8)
  for step in range(9, 13):
    logger.write(step, {"loss": 30.0 + step})
  logger.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["split"]) for r in rows]
  assert keys == [(s, "train") for s in range(1, 6)] + [(5, "eval")] + [
      (s, "train") for s in range(6, 13)]
  assert [r["loss"] for r in rows if r["split"] == "train"] == [
      10.0 + s for s in range(1, 9)] + [30.0 + s for s in range(9, 13)]


def test_fresh_logger_with_resume_step_zero_starts_an_empty_file(tmp_path):
  # A run that died before its first checkpoint restarts from step 0: its rows go.
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  MetricsLogger(str(tmp_path), total_steps=2, tensorboard=False, resume_step=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""
