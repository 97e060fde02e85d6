"""The `sft` stage: AutoThink cold start (KAT-V1 report §4.1).

  python -m experiments.run --config experiments/configs/sft.py

1. Data (`sft_data.py`, under `<workdir>/data/`, reused when present):
   - default: generate dual-regime tasks (`kat_jax/tasks/dual_regime.py`), tag each with a mode by majority vote over
     think-off samples (`tagging.py`; tagger 'simulated' | 'model' | 'endpoint') plus
     `random_fraction` random modes, and render cold-start examples (`templates.py`);
   - `tasks_path`: tag your own task records (minimal: prompt, answer, verifier type) instead
     of generated ones; a think_on-tagged record without a `think` trace is skipped, counted;
   - `sft_paths`: import chat JSONL/Parquet rows instead (`importers.py`).
   Skipped rows are logged, counted in `data/data_summary.json` and printed.
2. Train with the pretrain recipe on the trainer (`train.loop.run_training`), loss weights
   per segment (judge / mode / think / answer).
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
from ml_collections import ConfigDict

from kat_jax.autothink import generation, templates
from kat_jax.autothink.config import check_fields, segment_weights
from kat_jax.autothink.sft_data import data_skipped, prepare_sft_data
from kat_jax.checkpoint import models
from kat_jax.data import sources
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.progress import status
from kat_jax.tasks import dual_regime as tasks_lib
from kat_jax.train.loop import run_training


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
  status(f"sft: format rate {_fmt(summary.get('format_rate'))}, think-on rate easy "
         f"{_fmt(summary.get('think_on_rate_easy'))} / hard "
         f"{_fmt(summary.get('think_on_rate_hard'))}, accuracy {_fmt(summary.get('accuracy'))} "
         f"on {summary.get('num_prompts', 0)} held-out prompts ({train_seconds:.0f}s data+train)"
         f"; {skipped} data rows skipped")
  return {**train_metrics, "train_seconds": train_seconds, "data_skipped": skipped,
          **{f"eval_{k}": v for k, v in summary.items()}}


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"
