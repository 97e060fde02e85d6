"""The `pretrain` stage: build everything from the run config, then train with resumption.

Side effects live here (files, clocks, printing); the step itself is pure (train/step.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.data import pipeline, sources, synthetic
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig
from kat_jax.model.config import EXECUTION_FIELDS
from kat_jax.parallel import (batch_sharding, global_batch, init_sharded_state, make_mesh,
                              replicated, sharding_context)
from kat_jax.train.config_checks import check_training_config
from kat_jax.train.metrics import MetricsLogger
from kat_jax.train.optimizer import learning_rate_schedule, make_optimizer
from kat_jax.train.step import make_eval_step, make_train_step


def model_config_from(model_cfg: ConfigDict) -> ModelConfig:
  """`config.model`: a preset name plus any ModelConfig field left as None = preset value."""
  return models.config_from_model_fields(model_cfg)


def _split_paths(paths: str) -> list[str]:
  return [p for p in (s.strip() for s in paths.split(",")) if p]


def build_sources(data: ConfigDict, workdir: str, seed: int) -> tuple[Any, Any]:
  """(train_source, eval_source or None) from `config.data`.

  Generated sources write `<workdir>/data/<source>_{train,eval}.jsonl` once (seeds `seed`,
  `seed + 1`; sizes `data.synthetic_docs` / `synthetic_eval_docs`): 'synthetic' is the small
  procedural corpus, 'autothink' the dual-regime AutoThink tasks as plain text (question,
  reasoning for hard tasks, answer; `kat_jax.autothink.tasks.task_text`).
  """
  if data.source in ("synthetic", "autothink"):
    if data.source == "synthetic":
      write = synthetic.write_corpus_jsonl
    else:
      # pylint: disable-next=g-import-not-at-top  (only this source needs the task generator)
      from kat_jax.autothink.tasks import write_text_corpus as write
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path = os.path.join(data_dir, f"{data.source}_train.jsonl")
    eval_path = os.path.join(data_dir, f"{data.source}_eval.jsonl")
    if not (os.path.exists(train_path) and os.path.exists(eval_path)):
      write(train_path, data.synthetic_docs, seed)
      write(eval_path, data.synthetic_eval_docs, seed + 1)
    return sources.JsonlSource(train_path), sources.JsonlSource(eval_path)
  kinds = {"jsonl": sources.JsonlSource, "array_record": sources.ArrayRecordSource}
  if data.source not in kinds:
    raise ConfigError(f"config.data.source {data.source!r} not in "
                      f"{['synthetic', 'autothink', *kinds]}")
  train_paths = _split_paths(data.paths)
  if not train_paths:
    raise ConfigError(f"config.data.paths is empty; give the {data.source} files to read")
  for path in train_paths + _split_paths(data.eval_paths):
    if not os.path.exists(path):
      raise ConfigError(f"config.data: file not found: {path}")
  make = kinds[data.source]
  train = make(train_paths, on_error=data.on_error)
  evals = make(_split_paths(data.eval_paths), on_error=data.on_error) if data.eval_paths else None
  return train, evals


ToDocument = Callable[[dict[str, Any]], Any]  # record -> kat_jax.data.packing.Document


class _ProcessRows:
  """Every process reads the same global batches and keeps its own contiguous rows.

  `config.data.host_sharding='rows'`: the batches are identical whatever the process count
  (reproducible when scaling out) at the cost of every host tokenising all the data.
  """

  def __init__(self, iterator, rows: int):
    self._iterator, self._rows = iterator, rows
    self._start = jax.process_index() * rows

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    return {k: v[self._start:self._start + self._rows] for k, v in batch.items()}

  # Grain's Orbax handler stores non-DatasetIterator states as bytes.
  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    getattr(self._iterator, "start_prefetch", lambda: None)()


def local_batch_size(global_batch_size: int, mesh) -> int:
  """Rows each process loads: the global batch split over processes and batch shards."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise ConfigError(
        f"config.data.batch_size {global_batch_size} must be divisible by the mesh's "
        f"data×fsdp = {shards} and by the {jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def _batches(source, tokenizer: Tokenizer, data: ConfigDict, seed: int, local_rows: int, *,
             train: bool, to_document: ToDocument | None = None):
  """This process's batch iterator (checkpointable), sharded per `data.host_sharding`."""
  by_rows = data.host_sharding == "rows"
  if data.host_sharding not in ("rows", "source"):
    raise ConfigError(f"config.data.host_sharding {data.host_sharding!r} not in "
                      "['source', 'rows']")
  dataset = pipeline.make_pretrain_dataset(
      source, tokenizer, seq_len=data.seq_len,
      batch_size=local_rows * jax.process_count() if by_rows else local_rows, seed=seed,
      shuffle=train and data.shuffle, num_epochs=None if train else 1,
      shard_index=0 if by_rows else jax.process_index(),
      shard_count=1 if by_rows else jax.process_count(),
      long_docs=data.long_docs, to_document=to_document,
      read_options=grain.ReadOptions(num_threads=data.read_threads,
                                     prefetch_buffer_size=data.prefetch))
  iterator = iter(dataset)
  return _ProcessRows(iterator, local_rows) if by_rows and jax.process_count() > 1 else iterator


def _check_vocab(model_config: ModelConfig, tokenizer: Tokenizer) -> None:
  models.check_vocab(model_config, tokenizer, what="config.model")


def _load_hf(config: ConfigDict, model_config: ModelConfig) -> tuple[ModelConfig, Any]:
  """The HF checkpoint at `config.model.init_from`, run with `config.model`'s execution fields."""
  from kat_jax.checkpoint.hf import load_pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(config.model.init_from):
    raise ConfigError(f"config.model.init_from: no such directory {config.model.init_from}")
  overrides = {name: getattr(model_config, name) for name in EXECUTION_FIELDS}
  return load_pretrained(config.model.init_from, config_overrides=overrides)


def load_model(config: ConfigDict) -> tuple[ModelConfig, Any]:
  """(model config, params): `config.model.init_from` (any `kat_jax.checkpoint.models` source)
  or a random init of the preset.

  For evaluation, sampling and model surgery; training stages initialise sharded instead.
  """
  return models.load_configured_model(config.model, seed=config.seed)


def _initial_params(config: ConfigDict, model_config: ModelConfig) -> tuple[ModelConfig, Any]:
  """(model config, host params) from `config.model.init_from`, or (config, None) = fresh init."""
  if config.model.init_from:
    return _load_hf(config, model_config)
  return model_config, None


def evaluate(eval_step, params, dataset, max_batches: int, mesh) -> dict[str, float]:
  """Held-out weighted loss/accuracy over up to `max_batches` batches of `dataset`."""
  totals = {"ce_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
  for i, batch in enumerate(dataset):
    if i >= max_batches:
      break
    aux = jax.device_get(eval_step(params, global_batch(batch, mesh)))
    for k in totals:
      totals[k] += float(aux[k])
  denom = max(totals["weight_sum"], 1.0)
  return {"loss": totals["ce_sum"] / denom, "accuracy": totals["correct_sum"] / denom,
          "tokens": totals["weight_sum"]}


def run_pretrain(config: ConfigDict) -> dict[str, Any]:
  """Stage `pretrain`: next-token prediction on text/chat records. Returns the final metrics."""
  return run_training(config)


def run_training(config: ConfigDict, *, stage: str = "pretrain",
                 to_document: Callable[[Tokenizer], ToDocument] | None = None,
                 sources_fn: Callable[[ConfigDict, str], tuple[Any, Any]] | None = None,
                 ) -> dict[str, Any]:
  """The shared weighted next-token training loop of the pretrain and SFT-like stages.

  Args:
    config: the run config (see experiments/configs/base.py).
    stage: name shown in the progress output.
    to_document: tokenizer -> (record -> Document): how a record becomes tokens and
      per-token loss weights (default: `pipeline.record_to_document`).
    sources_fn: (config, workdir) -> (train source, eval source or None); default reads
      `config.data` (synthetic, jsonl or array_record).

  Returns:
    The metrics of the last step.
  """
  check_training_config(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = get_tokenizer(config.data.tokenizer)
  model_config, params = _initial_params(config, model_config_from(config.model))
  _check_vocab(model_config, tokenizer)
  train = config.train
  try:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  per_process_batch = local_batch_size(config.data.batch_size, mesh)
  if per_process_batch % train.grad_accum:
    raise ConfigError(f"config.train.grad_accum {train.grad_accum} must divide the "
                      f"{per_process_batch} rows each process loads per step")
  optimizer = make_optimizer(config.optim, train.steps)
  schedule = learning_rate_schedule(config.optim, train.steps)

  if sources_fn is None:
    train_source, eval_source = build_sources(config.data, workdir, config.seed)
  else:
    train_source, eval_source = sources_fn(config, workdir)
  doc_fn = to_document(tokenizer) if to_document is not None else None
  data_iter = _batches(train_source, tokenizer, config.data, config.seed, per_process_batch,
                       train=True, to_document=doc_fn)
  checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=train.checkpoint_every,
                                 keep=train.keep_checkpoints, async_save=train.async_checkpoint)
  meta = {"config": config.to_dict(), "model_config": model_config.to_dict()}

  with sharding_context(mesh):
    state, shardings = init_sharded_state(model_config, optimizer, mesh,
                                          jax.random.key(config.seed), params=params)
    del params
    resumed = checkpointer.latest_step() is not None
    if resumed:
      state, _ = checkpointer.restore(state, data_iter)
    logger = MetricsLogger(workdir, train.steps, tensorboard=train.tensorboard,
                           resume_step=int(state.step))
    if resumed:
      logger.status(f"resumed from step {int(state.step)} ({checkpointer.directory})")
    batch_sh = batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(model_config, optimizer, grad_accum=train.grad_accum,
                        loss_chunk=train.loss_chunk, z_loss=train.z_loss, schedule=schedule),
        in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,))
    eval_fn = jax.jit(make_eval_step(model_config, loss_chunk=train.loss_chunk),
                      in_shardings=(shardings.params, batch_sh), out_shardings=replicated(mesh))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logger.status(f"{stage}: {n_params:,} params, {train.steps} steps, batch "
                 f"{config.data.batch_size}x{config.data.seq_len}, mesh {dict(mesh.shape)}, "
                 f"workdir {workdir}")
    if logger.active:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)

    metrics: dict[str, Any] = {}
    start = time.perf_counter()
    step = int(state.step)
    while step < train.steps:
      local = next(data_iter)
      state, metrics = step_fn(state, global_batch(local, mesh))
      step += 1
      logger.count_tokens(float(np.sum(local["weights"] > 0)) * jax.process_count())
      if step % train.log_every == 0 or step == train.steps:
        logger.write(step, jax.device_get(metrics))
      if eval_source is not None and train.eval_every and (
          step % train.eval_every == 0 or step == train.steps):
        eval_ds = _batches(eval_source, tokenizer, config.data, config.seed, per_process_batch,
                           train=False, to_document=doc_fn)
        logger.write_eval(step, evaluate(eval_fn, state.params, eval_ds, train.eval_batches,
                                         mesh))
      checkpointer.save(step, state, data_iter, meta, force=step == train.steps)
  checkpointer.close()
  logger.close()
  final = {k: float(v) for k, v in jax.device_get(metrics).items()}
  logging.info("%s finished in %.1fs: %s", stage, time.perf_counter() - start, final)
  return final
