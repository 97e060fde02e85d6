"""The `sft` stage end to end at toy size, and the evaluation code on a fake model."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from experiments.configs.sft import get_config
from kat_jax.autothink import config as at_config, generation, sft_data, stage, tagging
from kat_jax.tasks import dual_regime as tasks
from kat_jax.data.chat_template import format_autothink_response
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.checkpoint import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_openai import FakeServer  # pylint: disable=g-import-not-at-top,wrong-import-position


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


def test_sft_stage_smoke(tmp_path, capsys):
  config = _toy_config(tmp_path)
  config.autothink.votes = 3  # still a majority vote; each vote verifies every task again
  metrics = stage.run_sft(config)
  assert "; 0 data rows skipped" in capsys.readouterr().out  # run_sft's status line
  assert metrics["data_skipped"] == 0
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
  model_config, params = models.load_model(str(tmp_path))
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
    at_config.parse_accuracy("easy=0.9")
  assert not os.path.exists(tmp_path / "data")


def test_imported_rows_skipped_are_printed_and_counted(tmp_path, capsys):
  config = _toy_config(tmp_path)
  good = {"messages": [{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}]}
  bad = {"messages": [{"role": "user", "content": "no answer"}]}  # last turn not assistant
  chat = tmp_path / "chat.jsonl"
  chat.write_text("\n".join(json.dumps(r) for r in [good, bad, good, good]) + "\n")
  config.autothink.sft_paths = str(chat)
  sft_data.prepare_sft_data(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "3 of 4 imported rows kept, 1 skipped" in out, out
  data = json.load(open(tmp_path / "data" / "data_summary.json"))
  assert data["skipped"] == 1 and "chat.jsonl line 2" in data["skip_reasons"][0]
  assert sft_data.data_skipped(str(tmp_path)) == 1  # what run_sft's status line prints


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _read(path):
  return [json.loads(line) for line in open(path)]


USER_TASKS = [  # minimal user records: prompt, answer, verifier type (+ optional fields)
    {"prompt": "What is 6 * 7?", "answer": "42", "verifier": "math", "domain": "math"},
    {"prompt": "What is the capital of Peru?", "answer": "Lima", "verifier": "exact"},
    {"prompt": "Compute (3 + 4) * 5.", "answer": "35", "verifier": "math",
     "think": "3 + 4 = 7. 7 * 5 = 35."},
    {"prompt": "Which is prime? A) 4 B) 7 C) 9 D) 8", "answer": "B", "verifier": "choice"},
]


def test_tasks_path_user_records_tagged_through_the_endpoint(tmp_path, monkeypatch, capsys):
  config = _toy_config(tmp_path)
  config.autothink.tasks_path = str(_jsonl(tmp_path / "mine.jsonl", USER_TASKS))
  config.autothink.num_eval = 2
  config.autothink.votes = 3
  config.autothink.random_fraction = 0.0
  config.autothink.tagger = "endpoint"
  config.autothink.endpoint_model = "fake-reasoner"
  config.autothink.endpoint_api_key_env = "KAT_TEST_TAG_KEY"
  monkeypatch.setenv("KAT_TEST_TAG_KEY", "k42")
  # Easy ones answered right (one after a reasoning block), hard ones wrong.
  answers = {USER_TASKS[0]["prompt"]: "42",
             USER_TASKS[1]["prompt"]: "<think>Peru... Lima.</think>\nLima",
             USER_TASKS[2]["prompt"]: "30", USER_TASKS[3]["prompt"]: "A"}
  with FakeServer(answers) as server:
    config.autothink.endpoint_url = server.url
    at_config.check_fields(config.autothink)
    paths = sft_data.prepare_sft_data(config, str(tmp_path))
  assert len(server.requests) == (4 + 2) * 3  # user tasks + generated eval tasks, 3 votes each
  assert server.requests[0]["auth"] == "Bearer k42"
  assert server.requests[0]["body"]["model"] == "fake-reasoner"

  tagged = _read(paths["train"].replace(".jsonl", "_tagged.jsonl"))
  assert [r["id"] for r in tagged] == [f"mine.jsonl:{i}" for i in range(1, 5)]
  assert [r["votes_correct"] for r in tagged] == [3, 3, 0, 0]
  assert [r["mode"] for r in tagged] == ["think_off", "think_off", "think_on", "think_on"]
  assert [r["domain"] for r in tagged] == ["math", "general", "math", "general"]
  # The last one went to think_on but has no trace: skipped and counted, not rendered.
  train = _read(paths["train"])
  assert [r["id"] for r in train] == ["mine.jsonl:1", "mine.jsonl:2", "mine.jsonl:3"]
  assert "<think>\n3 + 4 = 7. 7 * 5 = 35.\n</think>" in train[2]["messages"][-1]["content"]
  summary = json.load(open(tmp_path / "data" / "data_summary.json"))
  assert summary["train"]["skipped"] == 1 and "mine.jsonl:4" in summary["train"]["skip_reasons"][0]
  assert sft_data.data_skipped(str(tmp_path)) == 1


def test_tasks_path_bad_record_names_file_line_field(tmp_path):
  config = _toy_config(tmp_path)
  bad = _jsonl(tmp_path / "mine.jsonl", [USER_TASKS[0], {"prompt": "q", "verifier": "math"}])
  config.autothink.tasks_path = str(bad)
  with pytest.raises(ConfigError, match=r"tasks_path: .*mine.jsonl line 2: field 'answer'"):
    sft_data.prepare_sft_data(config, str(tmp_path))


def test_model_tagger_votes_with_a_tiny_random_model(tmp_path, monkeypatch):
  config = _toy_config(tmp_path)
  config.autothink.tagger = "model"  # config.model.init_from empty: a random init of the preset
  config.autothink.num_train = 4
  config.autothink.num_eval = 2
  config.autothink.votes = 2
  config.autothink.tag_max_new_tokens = 4
  config.autothink.random_fraction = 0.0
  calls = []
  original = generation.kat_generate_fn

  def spy(*args, **kwargs):
    generate = original(*args, **kwargs)

    def wrapped(prompts):
      responses = generate(prompts)
      calls.append((kwargs["think_mode"], responses))
      return responses

    return wrapped

  monkeypatch.setattr(stage.generation, "kat_generate_fn", spy)
  paths = sft_data.prepare_sft_data(config, str(tmp_path))
  assert len(calls) == 2 * 2  # train and eval tasks, 2 votes each
  for think_mode, responses in calls:  # the model answered with think-off forced
    assert think_mode == "off"
    assert all(r.startswith("\n</judge>\n\n<think_off>\n<answer>\n") for r in responses)
  tagged = _read(paths["train"].replace(".jsonl", "_tagged.jsonl"))
  assert len(tagged) == 4 and all(r["votes"] == 2 and r["mode_source"] == "vote" for r in tagged)
  assert all(r["mode"] == tagging.vote_mode(r["votes_correct"], 2) for r in tagged)
  assert len(_read(paths["train"])) == 4


def test_sft_training_killed_after_a_checkpoint_resumes_with_identical_losses(tmp_path):
  from kat_jax.testing import assert_resume_reproduces  # pylint: disable=g-import-not-at-top
  data_config = _toy_config(tmp_path / "data")
  data_config.autothink.update(num_train=16, num_eval=8, votes=1)
  paths = sft_data.prepare_sft_data(data_config, str(tmp_path / "data"))

  def run(workdir):
    config = _toy_config(workdir)
    config.train.update(steps=4, checkpoint_every=2, eval_every=0, async_checkpoint=False)
    stage.train_sft(config, paths)

  assert_resume_reproduces(run, str(tmp_path), steps=4, kill_before=4, resumes_at=2)
