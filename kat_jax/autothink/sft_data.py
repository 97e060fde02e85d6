"""The SFT stage's data (under `<workdir>/data/`, reused when present): generated or user tasks
tagged with a mode by majority vote and rendered, or imported chat rows; skipped rows counted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging
from ml_collections import ConfigDict

from kat_jax.autothink import generation, importers, tagging, templates
from kat_jax.autothink.config import parse_accuracy, split_paths
from kat_jax.checkpoint import models
from kat_jax.data import sources
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.tasks import dual_regime as tasks_lib

_MAX_REASONS = 20  # skip reasons logged one by one and kept in data_summary.json


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
                             seed=seed, time_limit=at.code_time_limit,
                             label=f"tagging {os.path.splitext(os.path.basename(path))[0]}")
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
    result = importers.import_sft_records(split_paths(at.sft_paths), on_error=at.on_error)
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
