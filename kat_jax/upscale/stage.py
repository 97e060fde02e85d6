"""The `upscale` stage: load a model, measure layer saturation, duplicate layers, save.

  python -m experiments.run --config experiments/configs/upscale_tiny.py
  python -m experiments.run --config experiments/configs/kat_v1_40b_upscale.py \
      --config.model.init_from=/path/to/Qwen2.5-32B --config.data.paths=calib.jsonl

Outputs under `<workdir>/`:
  saturation.json, saturation.png   per-layer cosine mean/std/min (if `upscale.analyze`)
  layer_map.json                    new index -> source index, inserted flag
  upscaled/hf/                      Hugging Face Qwen2 directory (config.json + safetensors)
  upscaled/orbax_params/            Orbax StandardCheckpointer params tree
  upscaled/model_config.json        kat_jax ModelConfig of the up-scaled model
  summary.json                      what was done, parameter counts, optional loss check
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.checkpoint.hf import save_pretrained
from kat_jax.data import pipeline
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import ModelConfig
from kat_jax.errors import ConfigError
from kat_jax.progress import status
from kat_jax.train.inputs import build_sources
from kat_jax.train.step import make_eval_step
from kat_jax.upscale import expand, saturation
from kat_jax.upscale.config import check_upscale_fields, choose_layer_map

def calibration_batches(config: ConfigDict, workdir: str, vocab_size: int):
  """One pass (no repeat) of packed [B,T] batches from `config.data`."""
  tokenizer = get_tokenizer(config.data.tokenizer)
  if vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model: vocab_size {vocab_size} is smaller than the tokenizer's"
                      f" {tokenizer.vocab_size} ids; pick a matching config.data.tokenizer")
  source, _ = build_sources(config.data, workdir, config.seed)
  return pipeline.make_pretrain_dataset(
      source, tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
      seed=config.seed, shuffle=config.data.shuffle, num_epochs=1,
      long_docs=config.data.long_docs)


def save_orbax_params(path: str, params: Mapping) -> None:
  """A plain Orbax params checkpoint (overwrites); restore with StandardCheckpointer.restore."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_orbax_params(path: str, abstract_params: Any | None = None) -> dict:
  checkpointer = ocp.StandardCheckpointer()
  if abstract_params is None:
    return checkpointer.restore(os.path.abspath(path))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)
  return checkpointer.restore(os.path.abspath(path), abstract)


def mean_loss(config: ModelConfig, params: Mapping, batches: list[dict]) -> float:
  """Weighted next-token loss over `batches` (used to show what up-scaling did to the model)."""
  eval_fn = jax.jit(make_eval_step(config))
  ce, weight = 0.0, 0.0
  for batch in batches:
    aux = jax.device_get(eval_fn(params, batch))
    ce, weight = ce + float(aux["ce_sum"]), weight + float(aux["weight_sum"])
  return ce / max(weight, 1.0)


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, default=str)
    f.write("\n")


def run_upscale(config: ConfigDict) -> dict[str, Any]:
  """Runs the stage described in the module docstring; returns the summary dict."""
  up = config.upscale
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  model_config, params = models.load_configured_model(config.model, seed=config.seed)
  status(f"upscale: source model {model_config.num_layers} layers, "
         f"{expand.count_params(params):,} params")

  check_upscale_fields(up, model_config.num_layers)
  report, kept = None, []
  if up.analyze or up.check_batches:
    dataset = calibration_batches(config, workdir, model_config.vocab_size)
    batches = iter(dataset)
    kept = [next(batches) for _ in range(up.check_batches)]  # also used for the analysis
  if up.analyze:
    rest = max(up.calibration_batches - len(kept), 0)
    stream = itertools.chain(kept[:up.calibration_batches], itertools.islice(batches, rest))
    report = saturation.analyze_saturation(model_config, params, stream)
    saturation.save_report_json(report, os.path.join(workdir, "saturation.json"),
                                extra={"calibration": config.data.to_dict()})

  layer_map = choose_layer_map(up, model_config.num_layers,
                               None if report is None else report.mean_cosine)
  if report is not None:
    saturation.plot_saturation(report, os.path.join(workdir, "saturation.png"),
                               selected=layer_map.duplicated)
  new_config, new_params = expand.upscale(model_config, params, layer_map, up.init)
  layer_map.save_json(os.path.join(workdir, "layer_map.json"),
                      extra={"placement": up.placement, "init": up.init,
                             "selection": up.selection})

  out_dir = os.path.join(workdir, "upscaled")
  os.makedirs(out_dir, exist_ok=True)
  _write_json(os.path.join(out_dir, "model_config.json"), new_config.to_dict())
  if up.save_orbax:
    save_orbax_params(os.path.join(out_dir, "orbax_params"), new_params)
  if up.save_hf:
    save_pretrained(os.path.join(out_dir, "hf"), new_config, new_params,
                    max_shard_size=up.max_shard_size, dtype=up.hf_dtype or None)

  summary: dict[str, Any] = {
      "source_num_layers": model_config.num_layers,
      "new_num_layers": new_config.num_layers,
      "duplicated_layers": layer_map.duplicated,
      "source_params": expand.count_params(params),
      "new_params": expand.count_params(new_params),
      "placement": up.placement, "init": up.init, "selection": up.selection,
  }
  if report is not None:
    summary["mean_cosine_of_duplicated"] = float(
        np.mean([report.mean_cosine[i] for i in layer_map.duplicated]))
  if kept:
    summary["loss_before"] = mean_loss(model_config, params, kept)
    summary["loss_after"] = mean_loss(new_config, new_params, kept)
  summary["seconds"] = time.perf_counter() - start
  _write_json(os.path.join(workdir, "summary.json"), summary)
  status(f"upscale: {model_config.num_layers} -> {new_config.num_layers} layers "
         f"(duplicated {layer_map.duplicated}), {summary['new_params']:,} params, "
         f"written to {workdir}")
  return summary
