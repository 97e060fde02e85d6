"""`config.autothink` (stage `sft`): the schema and its checks (one ConfigError per bad field),
and the `SegmentWeights` it fills (kat_jax/autothink/templates.py)."""

from __future__ import annotations

from ml_collections import ConfigDict

from kat_jax.autothink import templates
from kat_jax.errors import ConfigError
from kat_jax.field_checks import FRACTION, at_least, check_section

TAGGERS = ("simulated", "model", "endpoint")


def autothink_fields() -> ConfigDict:
  """`config.autothink` with its defaults."""
  return ConfigDict(dict(
      data_seed=1234,  # task streams: train = data_seed, eval = +1, held-out prompts = +2
      num_train=3000,  # generated training tasks
      num_eval=100,  # generated tasks for the held-out loss
      hard_fraction=0.5,
      tasks_path="",  # tag these task records (JSONL/ArrayRecord; minimal user records
      # {prompt, answer, verifier type} allowed, see tasks.Task.from_record) instead of generating
      sft_paths="",  # comma-separated chat JSONL/Parquet to import (skips generation/tagging)
      on_error="skip",  # malformed imported rows: 'skip' (counted, logged) or 'raise'
      # tagging
      tagger="simulated",  # 'simulated' (procedural solver) | 'model' | 'endpoint'
      votes=5,  # think-off samples per query
      random_fraction=0.01,  # queries given a random mode (report: 1%)
      solver_accuracy="1:0.9,2:0.2,3:0.1",  # simulated: P(correct | difficulty)
      tag_temperature=1.0,  # model/endpoint sampling temperature
      tag_max_new_tokens=128,
      endpoint_url="",  # OpenAI-compatible server, e.g. http://127.0.0.1:8000
      endpoint_model="",
      endpoint_api_key_env="OPENAI_API_KEY",  # environment variable holding the key, if any
      # loss weights per segment (the prompt is never trained)
      weights=ConfigDict(dict(judge=1.0, mode=1.0, think=1.0, answer=1.0)),
      # evaluation on held-out generated prompts
      eval_prompts=200,
      eval_max_new_tokens=160,
      eval_temperature=0.0,  # 0 = greedy
      eval_batch_size=100,
      code_time_limit=2.0,  # seconds per program in the code verifier
  ))


def split_paths(paths: str) -> list[str]:
  return [p for p in (s.strip() for s in paths.split(",")) if p]


def segment_weights(at: ConfigDict) -> templates.SegmentWeights:
  try:
    return templates.SegmentWeights(**at.weights.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.autothink.weights: {e}") from e


def parse_accuracy(text: str) -> dict[int, float]:
  """'1:0.9,2:0.2' -> {1: 0.9, 2: 0.2}."""
  try:
    table = {int(k): float(v) for k, v in (item.split(":") for item in split_paths(text))}
  except ValueError:
    raise ConfigError(f"config.autothink.solver_accuracy {text!r}: want "
                      "'difficulty:probability,...'") from None
  if not table or not all(0.0 <= p <= 1.0 for p in table.values()):
    raise ConfigError(f"config.autothink.solver_accuracy {text!r}: probabilities in [0, 1]")
  return table


def check_fields(at: ConfigDict) -> None:
  if at.tagger not in TAGGERS:
    raise ConfigError(f"config.autothink.tagger {at.tagger!r} not in {TAGGERS}")
  check_section(at, "autothink", {
      **{name: at_least(1) for name in ("num_train", "num_eval", "votes", "eval_prompts",
                                        "eval_max_new_tokens", "eval_batch_size")},
      "random_fraction": FRACTION, "hard_fraction": FRACTION})
  if at.tagger == "endpoint" and not (at.endpoint_url and at.endpoint_model):
    raise ConfigError("config.autothink.tagger 'endpoint' needs endpoint_url and endpoint_model")
  segment_weights(at)
