"""The `pretrain` stage (and the SFT-like stages built on it): weighted next-token training.

A recipe for the trainer (`kat_jax/train/trainer.py`): the state initialiser (preset init or
`config.model.init_from`), the step (`train/step.py`) and the data batches (`train/inputs.py`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from ml_collections import ConfigDict

from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig
from kat_jax.parallel import global_batch
from kat_jax.progress import status
from kat_jax.checkpoint import models
from kat_jax.train import inputs
from kat_jax.train.config_checks import check_training_config
from kat_jax.train.optimizer import learning_rate_schedule, make_optimizer
from kat_jax.train.state import init_sharded_state
from kat_jax.train.step import make_eval_step, make_train_step
from kat_jax.train.trainer import DataBatches, Trainer, mesh_from


def initial_params(config: ConfigDict) -> tuple[ModelConfig, Any]:
  """(model config, host params) of `config.model.init_from` (any model source), or
  (model config, None): the trainer initialises the preset directly sharded."""
  if config.model.init_from:
    return models.load_configured_model(config.model, seed=config.seed)
  return models.config_from_model_fields(config.model), None


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
                 to_document: Callable[[Tokenizer], inputs.ToDocument] | None = None,
                 sources_fn: Callable[[ConfigDict, str], tuple[Any, Any]] | None = None,
                 ) -> dict[str, Any]:
  """Weighted next-token training: the pretrain stage, and SFT with its own records.

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
  tokenizer = get_tokenizer(config.data.tokenizer)
  model_config, params = initial_params(config)
  models.check_vocab(model_config, tokenizer)
  train = config.train
  mesh = mesh_from(config)
  rows = inputs.local_batch_size(config.data.batch_size, mesh)
  if rows % train.grad_accum:
    raise ConfigError(f"config.train.grad_accum {train.grad_accum} must divide the "
                      f"{rows} rows each process loads per step")
  optimizer = make_optimizer(config.optim, train.steps)
  os.makedirs(workdir, exist_ok=True)
  if sources_fn is None:
    train_source, eval_source = inputs.build_sources(config.data, workdir, config.seed)
  else:
    train_source, eval_source = sources_fn(config, workdir)
  doc_fn = to_document(tokenizer) if to_document is not None else None
  data = DataBatches(inputs.batches(train_source, tokenizer, config.data, config.seed, rows,
                                    train=True, to_document=doc_fn), mesh)
  trainer = Trainer(config, name=stage, workdir=workdir, steps=train.steps, mesh=mesh,
                    meta={"model_config": model_config.to_dict()})
  status(f"{stage}: batch {config.data.batch_size}x{config.data.seq_len}")

  def init_state():
    return init_sharded_state(model_config, optimizer, mesh, jax.random.key(config.seed),
                              params=params)

  evaluate_fn = None
  if eval_source is not None and train.eval_every:
    eval_step = jax.jit(make_eval_step(model_config, loss_chunk=train.loss_chunk))

    def evaluate_fn(state):
      dataset = inputs.batches(eval_source, tokenizer, config.data, config.seed, rows,
                               train=False, to_document=doc_fn)
      return evaluate(eval_step, state.params, dataset, train.eval_batches, mesh)

  step = make_train_step(model_config, optimizer, grad_accum=train.grad_accum,
                         loss_chunk=train.loss_chunk, z_loss=train.z_loss,
                         schedule=learning_rate_schedule(config.optim, train.steps))
  result = trainer.fit(init_state, step, data, evaluate=evaluate_fn)
  return result.metrics
