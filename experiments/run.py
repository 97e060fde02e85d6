"""The one entry point: `python -m experiments.run --config experiments/configs/<name>.py`.

The config's `stage` field picks what runs; any field can be overridden on the command line
(`--config.train.steps=20`). Config mistakes end with a one-line error naming the field.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Path to a config file with get_config().",
    lock_config=True)

# stage name -> "module:function"; the function takes the ConfigDict.
STAGES = {
    "pretrain": "kat_jax.train.loop:run_pretrain",
}


def run_stage(config) -> dict:
  """Runs `config.stage` and returns its final metrics."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage {config.stage!r} not in {sorted(STAGES)}")
  module_name, fn_name = STAGES[config.stage].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter hides the progress line
  from kat_jax.train.loop import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    run_stage(_CONFIG.value)
  except ConfigError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
