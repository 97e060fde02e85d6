"""`config.data.source='autothink'`: pre-training / calibration on the dual-regime tasks."""

from __future__ import annotations

import json
import math

import pytest

from experiments.configs.base import base_config
from kat_jax.tasks import dual_regime as tasks
from kat_jax.errors import ConfigError
from kat_jax.train.inputs import build_sources
from kat_jax.train.loop import run_pretrain


def test_task_text_has_reasoning_only_for_hard_tasks():
  ts = tasks.generate_tasks(40, seed=3)
  for t in ts:
    text = tasks.task_text(t)
    assert text.startswith(f"Question: {t.prompt}\n") and text.endswith(f"Answer: {t.answer}")
    assert ("Reasoning: " in text) == (t.regime == "hard"), text
    if t.regime == "hard":
      assert f"Reasoning: {t.think}\n" in text


def test_tiny_pretrain_run_on_autothink_tasks(tmp_path):
  config = base_config()
  config.workdir = str(tmp_path)
  config.data.source = "autothink"
  config.data.synthetic_docs = 64
  config.data.synthetic_eval_docs = 16
  config.data.seq_len = 128
  config.data.batch_size = 8  # divisible by the 8 faked CPU devices (tests/conftest.py)
  config.model.hidden_size = 64
  config.model.intermediate_size = 128
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.optim.warmup_steps = 1
  config.train.steps = 4
  config.train.log_every = 1
  config.train.eval_every = 4
  config.train.eval_batches = 1
  config.train.checkpoint_every = 4
  config.train.tensorboard = False
  run_pretrain(config)

  data_dir = tmp_path / "data"
  train = [json.loads(line) for line in open(data_dir / "autothink_train.jsonl")]
  evals = [json.loads(line) for line in open(data_dir / "autothink_eval.jsonl")]
  assert len(train) == 64 and len(evals) == 16
  # The same tasks the generator gives for (seed, seed + 1), as text documents.
  assert [r["text"] for r in train] == [tasks.task_text(t)
                                        for t in tasks.generate_tasks(64, config.seed)]
  assert [r["text"] for r in evals] == [tasks.task_text(t)
                                        for t in tasks.generate_tasks(16, config.seed + 1)]
  assert {r["regime"] for r in train} == {"easy", "hard"}

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if r["split"] == "train"]
  assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
  assert [r for r in rows if r["split"] == "eval" and math.isfinite(r["loss"])]

  # Reused, not rewritten, when the run resumes or another stage reads the same workdir.
  before = (data_dir / "autothink_train.jsonl").stat().st_mtime_ns
  build_sources(config.data, str(tmp_path), config.seed)
  assert (data_dir / "autothink_train.jsonl").stat().st_mtime_ns == before


def test_unknown_source_lists_autothink(tmp_path):
  config = base_config()
  config.data.source = "tasks"
  with pytest.raises(ConfigError, match="autothink"):
    build_sources(config.data, str(tmp_path), 0)
