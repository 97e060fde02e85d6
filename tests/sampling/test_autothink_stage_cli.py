"""AutoThink prefills and stats, the `generate` stage and the chat CLI at tiny size."""

import json

import jax
import numpy as np
import pytest

from kat_jax.data.chat_template import parse_autothink_response, tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.sampling import autothink_stats, forced_mode_prefix, think_mode_prompts
from kat_jax.sampling.logits import SamplingParams, choose_tokens


def test_forced_mode_prefix_parses_as_that_mode():
  for mode, parsed_mode in (("on", "think_on"), ("off", "think_off")):
    text = forced_mode_prefix(mode, judge="easy") + "body\n</answer>"
    assert parse_autothink_response(text, judge_prefilled=True)["mode"] == parsed_mode
  assert forced_mode_prefix("off").endswith("<think_off>\n<answer>\n")
  assert forced_mode_prefix("on").endswith("<think_on>\n<think>\n")
  assert forced_mode_prefix("auto") == ""
  with pytest.raises(ValueError, match="think mode"):
    forced_mode_prefix("maybe")


def test_think_mode_prompts_append_after_kat_generation_prompt():
  tok = get_tokenizer("bytes")
  prompt = tokenize_chat(tok, [{"role": "user", "content": "hi"}],
                         add_generation_prompt=True).ids
  (forced,) = think_mode_prompts(tok, [prompt], "on")
  assert forced[:len(prompt)] == prompt
  assert tok.decode(forced).endswith("<|im_start|>assistant\n<judge>\n\n</judge>\n\n"
                                     "<think_on>\n<think>\n")


def test_autothink_stats_counts_modes_and_tokens():
  on = "j\n</judge>\n\n<think_on>\n<think>\nt\n</think>\n<answer>\na\n</answer>"
  off = "j\n</judge>\n\n<think_off>\n<answer>\na\n</answer>"
  stats = autothink_stats([on, off, off, "garbage"], [10, 4, 6, 3])
  assert stats["think_on_rate"] == 0.25 and stats["think_off_rate"] == 0.5
  assert stats["no_mode_rate"] == 0.25 and stats["well_formed_rate"] == 0.75
  assert stats["tokens_per_response"] == 5.75
  assert stats["tokens_think_on"] == 10 and stats["tokens_think_off"] == 5
  with pytest.raises(ValueError, match="token counts"):
    autothink_stats([on], [1, 2])


def test_vocab_limit_is_never_exceeded():
  logits = jax.numpy.zeros((3, 50)).at[:, 45].set(10.0)
  greedy = choose_tokens(logits, jax.random.key(0), SamplingParams(0.0, vocab_limit=40))
  sampled = choose_tokens(logits, jax.random.key(0), SamplingParams(1.0, vocab_limit=40))
  assert (np.asarray(greedy) < 40).all() and (np.asarray(sampled) < 40).all()


def test_generate_stage_writes_completions_and_summary(tmp_path):
  from experiments.configs.generate import get_config  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.stage import run_generate  # pylint: disable=g-import-not-at-top
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"id": "a", "prompt": "2+2?"}) + "\n" + json.dumps(
      {"messages": [{"role": "user", "content": "hello"}]}) + "\n")
  config = get_config()
  config.workdir = str(tmp_path / "run")
  config.model.num_layers = 2
  config.generate.prompts_path = str(prompts)
  config.generate.max_new_tokens = 6
  config.generate.num_samples = 2
  config.generate.think_mode = "off"
  summary = run_generate(config)
  rows = [json.loads(l) for l in open(tmp_path / "run" / "completions.jsonl")]
  assert [(r["id"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), (1, 0), (1, 1)]
  assert all(r["mode"] == "think_off" and 1 <= r["num_tokens"] <= 6 for r in rows)
  assert summary["think_on_rate"] == 0.0 and summary["think_off_rate"] == 1.0
  saved = json.load(open(tmp_path / "run" / "generate_summary.json"))
  assert saved["completions"] == 4


def test_generate_stage_greedy_completions_equal_for_paged_and_static_samplers(tmp_path):
  from experiments.configs.generate import get_config  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.stage import run_generate  # pylint: disable=g-import-not-at-top
  rows = {}
  for sampler in ("paged", "static"):
    config = get_config()
    config.workdir = str(tmp_path / sampler)
    config.model.num_layers = 1
    config.generate.prompts = ("2+2?", "a longer prompt, so the rows sit at other positions",
                               "hi")
    config.generate.sampler = sampler
    config.generate.temperature = 0.0
    config.generate.max_new_tokens = 10
    config.generate.num_samples = 2
    config.generate.batch_size = 2  # static: two calls
    config.generate.num_slots = 3  # paged: fewer slots than the 6 rows, pages of 4 tokens
    config.generate.page_size = 4
    run_generate(config)
    rows[sampler] = [json.loads(l) for l in open(tmp_path / sampler / "completions.jsonl")]
  paged, static = rows["paged"], rows["static"]
  assert len(paged) == 6
  for a, b in zip(paged, static):
    for key in ("id", "sample", "completion", "num_tokens", "stopped", "mode"):
      assert a[key] == b[key], key
    np.testing.assert_allclose(a["mean_logprob"], b["mean_logprob"], rtol=1e-5)
    np.testing.assert_allclose(a["mean_entropy"], b["mean_entropy"], rtol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("sampler", "fast", "sampler 'fast' not in"),
    ("num_slots", 0, "num_slots must be >= 1"),
    ("page_size", 0, "page_size must be >= 1"),
    ("num_pages", 1, "num_pages must be 0"),
    ("num_pages", 3, "prompt 0: .*KV pages"),  # too small a pool for the requests
])
def test_generate_stage_sampler_config_errors(tmp_path, field, value, message):
  from experiments.configs.generate import get_config  # pylint: disable=g-import-not-at-top
  from kat_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.stage import run_generate  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.workdir = str(tmp_path)
  config.model.num_layers = 1
  config.generate.max_new_tokens = 4
  config.generate[field] = value
  with pytest.raises(ConfigError, match=f"config.generate.*{message}"):
    run_generate(config)


def test_generate_stage_config_errors(tmp_path):
  from experiments.configs.generate import get_config  # pylint: disable=g-import-not-at-top
  from kat_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.stage import run_generate  # pylint: disable=g-import-not-at-top
  config = get_config()
  config.workdir = str(tmp_path)
  config.generate.think_mode = "sometimes"
  with pytest.raises(ConfigError, match="think_mode"):
    run_generate(config)
  config.generate.think_mode = "auto"
  config.generate.prompts_path = str(tmp_path / "missing.jsonl")
  with pytest.raises(ConfigError, match="file not found"):
    run_generate(config)


def test_chat_cli_streams_one_turn(capsys):
  from kat_jax.sampling import chat_cli  # pylint: disable=g-import-not-at-top
  chat_cli.main(["--preset", "tiny", "--prompt", "hi", "--max_new_tokens", "5",
                 "--think_mode", "off", "--dtype", "float32", "--max_length", "128"])
  out = capsys.readouterr().out
  assert out.startswith("assistant> <judge>\n\n</judge>\n\n<think_off>\n<answer>\n")
  assert len(out) > len("assistant> <judge>\n\n</judge>\n\n<think_off>\n<answer>\n")
