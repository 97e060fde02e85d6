"""The `mesh`, `data`, `optim` and `train` fields every training stage shares: schemas and
up-front checks.

A bad value (a typo'd tokenizer, a zero batch, a negative learning rate) ends the run before
anything is built, with a one-line `ConfigError` naming the field, instead of a traceback
from deep inside the pipeline or a silently odd run.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from kat_jax.data.tokenizer import TOKENIZER_NAMES
from kat_jax.errors import ConfigError
from kat_jax.field_checks import (BETA, FRACTION, NON_NEGATIVE, POSITIVE, check_section,
                                  one_of)

DATA_CHECKS = {
    "tokenizer": one_of(*TOKENIZER_NAMES),
    "seq_len": POSITIVE, "batch_size": POSITIVE,
    "long_docs": one_of("split", "truncate"), "on_error": one_of("raise", "skip"),
    "host_sharding": one_of("source", "rows"),
    "synthetic_docs": POSITIVE, "synthetic_eval_docs": NON_NEGATIVE,
    "read_threads": POSITIVE, "prefetch": NON_NEGATIVE,
}
OPTIM_CHECKS = {
    "lr": POSITIVE, "warmup_steps": NON_NEGATIVE, "min_lr_ratio": FRACTION,
    "weight_decay": NON_NEGATIVE, "b1": BETA, "b2": BETA, "eps": POSITIVE,
    "clip_norm": NON_NEGATIVE,
}
TRAIN_CHECKS = {
    "steps": POSITIVE, "grad_accum": POSITIVE, "loss_chunk": POSITIVE,
    "z_loss": NON_NEGATIVE, "log_every": POSITIVE, "eval_every": NON_NEGATIVE,
    "eval_batches": POSITIVE, "checkpoint_every": NON_NEGATIVE,
    "keep_checkpoints": POSITIVE,
}


def check_training_config(config: Any) -> None:
  """Checks `config.data`, `config.optim` and `config.train` (see the tables above)."""
  for section, checks in (("data", DATA_CHECKS), ("optim", OPTIM_CHECKS),
                          ("train", TRAIN_CHECKS)):
    check_section(config.get(section), section, checks)
  train = config.get("train")
  data = config.get("data")
  if train is not None and data is not None and "grad_accum" in train:
    if data.batch_size % train.grad_accum:
      raise ConfigError(f"config.data.batch_size {data.batch_size} must be divisible by "
                        f"config.train.grad_accum {train.grad_accum}")


# ---------------------------------------------------------------------------------------------
# The schemas of the shared sections (experiments/configs/base.py composes them).


def mesh_fields() -> ConfigDict:
  """`config.mesh`: device mesh sizes of (data, fsdp, tensor); -1 = the rest of the devices."""
  return ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def distributed_fields() -> ConfigDict:
  """`config.distributed`: multi-process runs (kat_jax/parallel/distributed.py); empty = one."""
  return ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                         local_device_ids="", auto=False))


def data_fields() -> ConfigDict:
  """`config.data` (checked by `DATA_CHECKS`)."""
  return ConfigDict(dict(
      tokenizer="bytes",  # 'bytes' (CPU experiments) or 'qwen2.5' (real vocabulary)
      source="synthetic",  # 'synthetic' | 'autothink' | 'jsonl' | 'array_record'
      paths="",  # comma-separated files for jsonl/array_record
      eval_paths="",
      synthetic_docs=20000,
      synthetic_eval_docs=400,
      seq_len=256,
      batch_size=16,  # global rows per step, over all processes
      # multi-process input: 'source' = each process reads a disjoint slice of the records;
      # 'rows' = each reads everything and keeps its rows (batches independent of #processes)
      host_sharding="source",
      shuffle=True,
      long_docs="split",  # 'split' | 'truncate'
      on_error="raise",  # malformed rows: 'raise' or 'skip' (counted and logged)
      read_threads=2,
      prefetch=64,
  ))


def optim_fields() -> ConfigDict:
  """`config.optim` (checked by `OPTIM_CHECKS`)."""
  return ConfigDict(dict(
      lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
  ))


def train_fields() -> ConfigDict:
  """`config.train` (checked by `TRAIN_CHECKS`)."""
  return ConfigDict(dict(
      steps=300,
      grad_accum=1,
      loss_chunk=1024,  # tokens per LM-head chunk in the loss
      z_loss=0.0,
      log_every=10,
      eval_every=100,
      eval_batches=8,
      checkpoint_every=100,
      keep_checkpoints=2,
      async_checkpoint=True,
      tensorboard=True,
  ))
