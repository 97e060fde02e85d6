"""The step_srpo stage runs end to end (tiny random model) and writes its curves and summary."""

import json
import os

from experiments.configs.step_srpo import get_config
from kat_jax.errors import ConfigError
from kat_jax.rl.stage import run_step_srpo

import pytest


def _config(tmp_path):
  config = get_config()
  config.workdir = str(tmp_path / "rl")
  config.model.num_layers = 1
  config.rl.steps = 2
  config.rl.prompts_per_step = 2
  config.rl.group_size = 3
  config.rl.max_new_tokens = 16
  config.rl.eval_prompts = 2
  config.train.tensorboard = False
  return config


def test_stage_writes_curves_and_summary(tmp_path):
  summary = run_step_srpo(_config(tmp_path))
  workdir = tmp_path / "rl"
  history = json.loads((workdir / "rl_curves.json").read_text())["history"]
  assert [h["step"] for h in history] == [1, 2]
  for h in history:
    assert 0.0 <= h["format_rate"] <= 1.0 and h["response_tokens"] > 0
  assert os.path.getsize(workdir / "rl_curves.png") > 0
  assert summary["heldout"]["num_prompts"] == 2
  assert json.loads((workdir / "rl_summary.json").read_text())["last"]["step"] == 2


def test_bad_mix_and_missing_sft_run_are_config_errors(tmp_path):
  config = _config(tmp_path)
  config.rl.stage1_mix = "easy:1,medium:1"
  with pytest.raises(ConfigError, match="unknown regimes \\['medium'\\]"):
    run_step_srpo(config)
  config = _config(tmp_path)
  config.rl.init_sft_workdir = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match="no checkpoints under"):
    run_step_srpo(config)
