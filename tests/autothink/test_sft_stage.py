"""The `sft` stage end to end at toy size, and the evaluation code on a fake model."""

from __future__ import annotations

import json
import math
import os

import pytest

from experiments.configs.sft import get_config
from kat_jax.autothink import generation, stage, tagging, tasks
from kat_jax.data.chat_template import format_autothink_response
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError


def test_evaluate_autothink_rates_with_a_fake_model():
  ts = tasks.generate_tasks(20, seed=5)
  by_prompt = {t.prompt: t for t in ts}

  def generate(prompts):  # think_on on hard, think_off on easy; every answer right
    out = []
    for p in prompts:
      t = by_prompt[p]
      mode = "think_on" if t.regime == "hard" else "think_off"
      think = t.think if mode == "think_on" else None
      text = format_autothink_response("j", mode, t.answer, think)
      out.append(text[len("<judge>\n"):])  # generation continues after the prefilled tag
    out[0] = "garbage"
    return out

  summary, rows = generation.evaluate_autothink(generate, ts)
  assert summary["format_rate"] == pytest.approx(19 / 20)
  hard = [t for t in ts[1:] if t.regime == "hard"]
  easy = [t for t in ts[1:] if t.regime == "easy"]
  num_hard = len(hard) + (ts[0].regime == "hard")  # ts[0] got garbage: no mode
  assert summary["think_on_rate_hard"] == pytest.approx(len(hard) / num_hard)
  assert summary["think_on_rate_easy"] == 0.0
  assert summary["accuracy"] == pytest.approx(19 / 20)
  assert rows[0]["mode"] is None and not rows[0]["well_formed"]
  assert len(easy) and len(hard)


def _toy_config(workdir):
  config = get_config()
  config.workdir = str(workdir)
  config.model.hidden_size = 64
  config.model.intermediate_size = 128
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.data.seq_len = 256
  config.data.batch_size = 8  # one row per faked CPU device (tests/conftest.py)
  config.optim.warmup_steps = 2
  config.train.steps = 6
  config.train.log_every = 1
  config.train.eval_every = 6
  config.train.eval_batches = 1
  config.train.checkpoint_every = 6
  config.train.tensorboard = False
  config.autothink.num_train = 48
  config.autothink.num_eval = 8
  config.autothink.eval_prompts = 6
  config.autothink.eval_max_new_tokens = 12
  config.autothink.weights.think = 0.5
  return config


def test_sft_stage_smoke(tmp_path):
  config = _toy_config(tmp_path)
  metrics = stage.run_sft(config)
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")
            if json.loads(line)["split"] == "train"]
  assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0]
  summary = json.load(open(tmp_path / "sft_eval.json"))
  for key in ("format_rate", "think_on_rate_easy", "think_on_rate_hard", "accuracy"):
    assert key in summary
  assert summary["num_prompts"] == 6 and metrics["eval_num_prompts"] == 6
  data = json.load(open(tmp_path / "data" / "data_summary.json"))
  assert data["train"]["num"] == 48
  rows = [json.loads(line) for line in open(tmp_path / "sft_eval_samples.jsonl")]
  assert len(rows) == 6 and {"response", "mode", "well_formed"} <= set(rows[0])

  # The trained model as a think-off GenerateFn for the vote: the forced prefill is kept.
  model_config, params = stage.trained_model(config, str(tmp_path))
  generate = generation.kat_generate_fn(params, model_config, get_tokenizer("bytes"),
                                        think_mode="off", max_new_tokens=12, temperature=0.0)
  ts = tasks.generate_tasks(3, seed=0)
  responses = generate([t.prompt for t in ts])
  assert all(r.startswith("\n</judge>\n\n<think_off>\n<answer>\n") for r in responses)
  tagged = tagging.tag_tasks(ts, generate, num_samples=2, random_fraction=0.0)
  assert all(r["mode"] in ("think_on", "think_off") for r in tagged)


def test_config_errors_name_the_field(tmp_path):
  config = _toy_config(tmp_path)
  config.autothink.tagger = "oracle"
  with pytest.raises(ConfigError, match="config.autothink.tagger"):
    stage.run_sft(config)
  config = _toy_config(tmp_path)
  config.autothink.weights.judge = -1.0
  with pytest.raises(ConfigError, match="config.autothink.weights"):
    stage.run_sft(config)
  with pytest.raises(ConfigError, match="solver_accuracy"):
    stage.parse_accuracy("easy=0.9")
  assert not os.path.exists(tmp_path / "data")
