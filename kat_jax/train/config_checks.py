"""The `mesh`, `data`, `optim` and `train` fields every training stage shares: schemas and
up-front checks.

A bad value (a typo'd tokenizer, a zero batch, a negative learning rate) ends the run before
anything is built, with a one-line `ConfigError` naming the field, instead of a traceback
from deep inside the pipeline or a silently odd run.
"""

from __future__ import annotations

from typing import Any, Callable

from ml_collections import ConfigDict

from kat_jax.data.tokenizer import TOKENIZER_NAMES
from kat_jax.errors import ConfigError

_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")


def _one_of(*choices: str):
  return (lambda v: v in choices, f"one of {list(choices)}")


DATA_CHECKS = {
    "tokenizer": _one_of(*TOKENIZER_NAMES),
    "seq_len": _POSITIVE, "batch_size": _POSITIVE,
    "long_docs": _one_of("split", "truncate"), "on_error": _one_of("raise", "skip"),
    "host_sharding": _one_of("source", "rows"),
    "synthetic_docs": _POSITIVE, "synthetic_eval_docs": _NON_NEGATIVE,
    "read_threads": _POSITIVE, "prefetch": _NON_NEGATIVE,
}
OPTIM_CHECKS = {
    "lr": _POSITIVE, "warmup_steps": _NON_NEGATIVE, "min_lr_ratio": _FRACTION,
    "weight_decay": _NON_NEGATIVE, "b1": _BETA, "b2": _BETA, "eps": _POSITIVE,
    "clip_norm": _NON_NEGATIVE,
}
TRAIN_CHECKS = {
    "steps": _POSITIVE, "grad_accum": _POSITIVE, "loss_chunk": _POSITIVE,
    "z_loss": _NON_NEGATIVE, "log_every": _POSITIVE, "eval_every": _NON_NEGATIVE,
    "eval_batches": _POSITIVE, "checkpoint_every": _NON_NEGATIVE,
    "keep_checkpoints": _POSITIVE,
}


def check_section(config: Any, section: str, checks: dict[str, tuple[Callable, str]]) -> None:
  """Raises ConfigError for the first field of `config.<section>` that fails its check.

  Fields a stage's config does not have are skipped (stages share only part of the base).
  """
  values = config.get(section)
  if values is None:
    return
  for name, (ok, must_be) in checks.items():
    if name not in values:
      continue
    value = values[name]
    try:
      good = ok(value)
    except TypeError:
      good = False
    if not good:
      raise ConfigError(f"config.{section}.{name} must be {must_be}, got {value!r}")


def check_training_config(config: Any) -> None:
  """Checks `config.data`, `config.optim` and `config.train` (see the tables above)."""
  check_section(config, "data", DATA_CHECKS)
  check_section(config, "optim", OPTIM_CHECKS)
  check_section(config, "train", TRAIN_CHECKS)
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
