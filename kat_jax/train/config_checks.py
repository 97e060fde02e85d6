"""Up-front checks of the `data`, `optim` and `train` fields every training stage shares.

A bad value (a typo'd tokenizer, a zero batch, a negative learning rate) ends the run before
anything is built, with a one-line `ConfigError` naming the field, instead of a traceback
from deep inside the pipeline or a silently odd run.
"""

from __future__ import annotations

from typing import Any, Callable

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
