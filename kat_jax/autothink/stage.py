"""The `sft` stage: AutoThink cold start (seed `001_*` §4.1).

  python -m experiments.run --config experiments/configs/sft.py

1. Data (under `<workdir>/data/`, reused when present):
   - default: generate dual-regime tasks (`tasks.py`), tag each with a mode by majority vote over
     think-off samples (`tagging.py`; tagger 'simulated' | 'model' | 'endpoint') plus
     `random_fraction` random modes, and render cold-start examples (`templates.py`);
   - `tasks_path`: tag your own task records (minimal: prompt, answer, verifier type) instead
     of generated ones; a think_on-tagged record without a `think` trace is skipped, counted;
   - `sft_paths`: import chat JSONL/Parquet rows instead (`importers.py`).
   Skipped rows are logged, counted in `data/data_summary.json` and printed.
2. Train with the pretrain recipe on the trainer (`train.loop.run_training`), loss weights per segment
   (judge / mode / think / answer).
3. Evaluate the trained model on held-out generated tasks (another seed): it chooses its mode
   (greedy by default); report the format rate and the think-on rate on easy vs hard queries.
   Written to `<workdir>/sft_eval.json` and `sft_eval_samples.jsonl`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from kat_jax.autothink import generation, importers, tagging, templates
from kat_jax.tasks import dual_regime as tasks_lib
from kat_jax.checkpoint import models
from kat_jax.data import sources
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.train.loop import run_training

TAGGERS = ("simulated", "model", "endpoint")
_MAX_REASONS = 20  # skip reasons logged one by one and kept in data_summary.json


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


def _split(paths: str) -> list[str]:
  return [p for p in (s.strip() for s in paths.split(",")) if p]


def segment_weights(at: ConfigDict) -> templates.SegmentWeights:
  try:
    return templates.SegmentWeights(**at.weights.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.autothink.weights: {e}") from e


def parse_accuracy(text: str) -> dict[int, float]:
  """'1:0.9,2:0.2' -> {1: 0.9, 2: 0.2}."""
  try:
    table = {int(k): float(v) for k, v in (item.split(":") for item in _split(text))}
  except ValueError:
    raise ConfigError(f"config.autothink.solver_accuracy {text!r}: want "
                      "'difficulty:probability,...'") from None
  if not table or not all(0.0 <= p <= 1.0 for p in table.values()):
    raise ConfigError(f"config.autothink.solver_accuracy {text!r}: probabilities in [0, 1]")
  return table


def check_fields(at: ConfigDict) -> None:
  if at.tagger not in TAGGERS:
    raise ConfigError(f"config.autothink.tagger {at.tagger!r} not in {TAGGERS}")
  for name in ("num_train", "num_eval", "votes", "eval_prompts", "eval_max_new_tokens",
               "eval_batch_size"):
    if at[name] < 1:
      raise ConfigError(f"config.autothink.{name} must be >= 1, got {at[name]}")
  if not 0.0 <= at.random_fraction <= 1.0:
    raise ConfigError(f"config.autothink.random_fraction must be in [0, 1], got "
                      f"{at.random_fraction}")
  if not 0.0 <= at.hard_fraction <= 1.0:
    raise ConfigError(f"config.autothink.hard_fraction must be in [0, 1], got {at.hard_fraction}")
  if at.tagger == "endpoint" and not (at.endpoint_url and at.endpoint_model):
    raise ConfigError("config.autothink.tagger 'endpoint' needs endpoint_url and endpoint_model")
  segment_weights(at)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def make_generate_fn(config: ConfigDict, tokenizer: Tokenizer, task_list
                     ) -> tagging.GenerateFn:
  """The think-off sampler the vote uses (see `config.autothink.tagger`)."""
  at = config.autothink
  if at.tagger == "simulated":
    return tagging.simulated_solver(task_list, accuracy=parse_accuracy(at.solver_accuracy),
                                    seed=at.data_seed)
  if at.tagger == "endpoint":
    return tagging.openai_generate_fn(
        at.endpoint_url, at.endpoint_model, api_key=os.environ.get(at.endpoint_api_key_env),
        temperature=at.tag_temperature, max_tokens=at.tag_max_new_tokens)
  model_config, params = models.load_configured_model(config.model, seed=config.seed)
  return generation.kat_generate_fn(params, model_config, tokenizer, think_mode="off",
                                    max_new_tokens=at.tag_max_new_tokens,
                                    temperature=at.tag_temperature, seed=config.seed)


def tagging_summary(tagged: list[dict[str, Any]]) -> dict[str, Any]:
  modes = np.asarray([r["mode"] == "think_on" for r in tagged])
  regimes = np.asarray([r.get("regime") for r in tagged], object)
  out = {"num": len(tagged), "think_on_fraction": float(modes.mean()) if len(tagged) else 0.0,
         "random_assigned": sum(r["mode_source"] == "random" for r in tagged)}
  for regime in tasks_lib.REGIMES:
    picked = modes[regimes == regime]
    out[f"think_on_fraction_{regime}"] = float(picked.mean()) if picked.size else None
  return out


def _tag_and_render(config: ConfigDict, tokenizer: Tokenizer, task_list, path: str,
                    seed: int) -> dict[str, Any]:
  at = config.autothink
  tagged = tagging.tag_tasks(task_list, make_generate_fn(config, tokenizer, task_list),
                             num_samples=at.votes, random_fraction=at.random_fraction,
                             seed=seed, time_limit=at.code_time_limit)
  records, reasons = render_tagged(tagged)
  if not records:
    raise ConfigError(f"none of the {len(tagged)} tagged tasks could be rendered "
                      f"({reasons[:3]}); give user task records a 'think' trace")
  sources.write_jsonl(records, path)
  sources.write_jsonl(tagged, path.replace(".jsonl", "_tagged.jsonl"))
  return {**tagging_summary(tagged), "skipped": len(tagged) - len(records),
          "skip_reasons": reasons[:_MAX_REASONS]}


def render_tagged(tagged: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
  """(SFT records, skip reasons) of tagged tasks. A task the vote sent to think_on but that
  has no reasoning trace (a user record without 'think') cannot be a think-on example: it is
  skipped, logged and counted, never dropped silently."""
  records, reasons = [], []
  for record in tagged:
    try:
      records.append(templates.sft_record(record))
    except ValueError as e:
      reasons.append(str(e))
      if len(reasons) <= _MAX_REASONS:
        logging.warning("sft data: skipping tagged task: %s", e)
  if reasons:
    logging.warning("sft data: skipped %d of %d tagged tasks", len(reasons), len(tagged))
  return records, reasons


def prepare_sft_data(config: ConfigDict, workdir: str) -> dict[str, str]:
  """Writes (or finds) the SFT train/eval JSONL and held-out tasks; returns their paths."""
  at = config.autothink
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  paths = {"train": os.path.join(data_dir, "sft_train.jsonl"),
           "eval": os.path.join(data_dir, "sft_eval.jsonl"),
           "heldout": os.path.join(data_dir, "heldout_tasks.jsonl")}
  if not os.path.exists(paths["heldout"]):
    tasks_lib.write_tasks(paths["heldout"], at.eval_prompts, at.data_seed + 2,
                          hard_fraction=at.hard_fraction)
  if os.path.exists(paths["train"]) and os.path.exists(paths["eval"]):
    return paths
  tokenizer = get_tokenizer(config.data.tokenizer)
  summary: dict[str, Any] = {}
  if at.sft_paths:
    result = importers.import_sft_records(_split(at.sft_paths), on_error=at.on_error)
    if len(result.records) < 2:
      raise ConfigError(f"config.autothink.sft_paths: only {len(result.records)} usable rows "
                        f"({result.num_skipped} skipped: {result.errors[:3]})")
    n_eval = max(1, min(at.num_eval, len(result.records) // 10))
    sources.write_jsonl(result.records[n_eval:], paths["train"])
    sources.write_jsonl(result.records[:n_eval], paths["eval"])
    summary = {"imported_rows": result.num_rows, "skipped": result.num_skipped,
               "skip_reasons": result.errors}
    print(f"sft data: {len(result.records)} of {result.num_rows} imported rows kept, "
          f"{result.num_skipped} skipped (reasons logged and in data/data_summary.json)",
          flush=True)
  else:
    if at.tasks_path:
      try:
        train_tasks = tasks_lib.read_tasks(at.tasks_path)
      except (OSError, ValueError) as e:
        raise ConfigError(f"config.autothink.tasks_path: {e}") from e
      if at.tagger == "simulated" and any(t.kind == "user" for t in train_tasks):
        logging.warning("tagger 'simulated' votes on user tasks by their difficulty only; "
                        "use tagger 'model' or 'endpoint' for real votes")
    else:
      train_tasks = tasks_lib.generate_tasks(at.num_train, at.data_seed,
                                             hard_fraction=at.hard_fraction)
    eval_tasks = tasks_lib.generate_tasks(at.num_eval, at.data_seed + 1,
                                          hard_fraction=at.hard_fraction)
    summary["train"] = _tag_and_render(config, tokenizer, train_tasks, paths["train"],
                                       at.data_seed)
    summary["eval"] = _tag_and_render(config, tokenizer, eval_tasks, paths["eval"],
                                      at.data_seed + 1)
  with open(os.path.join(data_dir, "data_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return paths


def _document_fn(tokenizer: Tokenizer, weights: templates.SegmentWeights):
  return functools.partial(templates.sft_document, tokenizer=tokenizer, weights=weights)


# ---------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------


def evaluate_model(config: ConfigDict, workdir: str, heldout_path: str) -> dict[str, Any]:
  """AutoThink metrics of the trained model on the held-out tasks; writes them to workdir."""
  at = config.autothink
  tokenizer = get_tokenizer(config.data.tokenizer)
  model_config, params = models.load_model(
      workdir, execution=models.config_from_model_fields(config.model))
  heldout = tasks_lib.read_tasks(heldout_path)
  generate = generation.kat_generate_fn(
      params, model_config, tokenizer, think_mode="auto", max_new_tokens=at.eval_max_new_tokens,
      temperature=at.eval_temperature, batch_size=at.eval_batch_size, seed=config.seed + 1)
  start = time.perf_counter()
  summary, rows = generation.evaluate_autothink(generate, heldout, time_limit=at.code_time_limit)
  summary["eval_seconds"] = time.perf_counter() - start
  with open(os.path.join(workdir, "sft_eval.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  sources.write_jsonl(rows, os.path.join(workdir, "sft_eval_samples.jsonl"))
  return summary


def train_sft(config: ConfigDict, paths: dict[str, str]) -> dict[str, Any]:
  """The SFT training run on the prepared data: the pretrain recipe with per-segment weights."""
  weights = segment_weights(config.autothink)

  def sources_fn(cfg, _):
    return (sources.JsonlSource(paths["train"], on_error=cfg.data.on_error),
            sources.JsonlSource(paths["eval"], on_error=cfg.data.on_error))

  return run_training(config, stage="sft", to_document=lambda tok: _document_fn(tok, weights),
                      sources_fn=sources_fn)


def run_sft(config: ConfigDict) -> dict[str, Any]:
  """Stage `sft`: data -> weighted SFT -> AutoThink evaluation. Returns train + eval metrics."""
  if "autothink" not in config:
    raise ConfigError("config.autothink is missing; start from experiments/configs/sft.py")
  at = config.autothink
  check_fields(at)
  workdir = os.path.abspath(config.workdir)
  start = time.perf_counter()
  paths = prepare_sft_data(config, workdir)
  train_metrics = train_sft(config, paths)
  train_seconds = time.perf_counter() - start
  summary = evaluate_model(config, workdir, paths["heldout"]) if jax.process_index() == 0 else {}
  skipped = data_skipped(workdir)
  print(f"sft: format rate {_fmt(summary.get('format_rate'))}, think-on rate easy "
        f"{_fmt(summary.get('think_on_rate_easy'))} / hard "
        f"{_fmt(summary.get('think_on_rate_hard'))}, accuracy {_fmt(summary.get('accuracy'))} "
        f"on {summary.get('num_prompts', 0)} held-out prompts ({train_seconds:.0f}s data+train)"
        f"; {skipped} data rows skipped", flush=True)
  return {**train_metrics, "train_seconds": train_seconds, "data_skipped": skipped,
          **{f"eval_{k}": v for k, v in summary.items()}}


def data_skipped(workdir: str) -> int:
  """Rows the data step skipped (imported rows, or tagged tasks that could not be rendered),
  read back from `<workdir>/data/data_summary.json` so reused data reports it too."""
  path = os.path.join(workdir, "data", "data_summary.json")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  return int(summary.get("skipped", 0)) + sum(
      int(part.get("skipped", 0)) for part in summary.values() if isinstance(part, dict))


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"
