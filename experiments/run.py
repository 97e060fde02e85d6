"""The one entry point: `python -m experiments.run --config experiments/configs/<name>.py`.

The config's `stage` field picks what runs; any field can be overridden on the command line
(`--config.train.steps=20`). Config mistakes end with a one-line error naming the field.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kat_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config(), e.g. "
    "experiments/configs/default.py.", lock_config=True)
flags.mark_flag_as_required("config")

# stage name -> "module:function"; the function takes the ConfigDict.
STAGES = {
    "pretrain": "kat_jax.train.loop:run_pretrain",
    "upscale": "kat_jax.upscale.stage:run_upscale",
    "generate": "kat_jax.sampling.stage:run_generate",
    "sft": "kat_jax.autothink.stage:run_sft",
    "step_srpo": "kat_jax.rl.stage:run_step_srpo",
    "distill": "kat_jax.distill.stage:run_distill",
    "teacher_logits": "kat_jax.distill.teacher_stage:run_teacher_logits",
    "agentic_rl": "kat_jax.agentic.stage:run_agentic_rl",
    "eval": "kat_jax.eval.stage:run_eval",
    "export": "kat_jax.checkpoint.export:run_export",
}


def run_stage(config) -> dict:
  """Runs `config.stage` and returns its final metrics."""
  if config.stage not in STAGES:
    raise ConfigError(f"config.stage {config.stage!r} not in {sorted(STAGES)}")
  module_name, fn_name = STAGES[config.stage].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter hides the progress line
  config = _CONFIG.value
  try:
    config.stage  # pylint: disable=pointless-statement; a failed load raises here
  except OSError as e:  # the config file is missing or does not import
    print(f"error: {str(e).splitlines()[0]}: {flags.FLAGS['config'].config_filename}",
          file=sys.stderr)
    sys.exit(2)
  try:
    from kat_jax.parallel.distributed import initialize_distributed  # pylint: disable=g-import-not-at-top
    initialize_distributed(config.get("distributed"))
    run_stage(config)
  except ConfigError as e:
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config-override mistakes reported on one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (KeyError, AttributeError) as e:  # ml_collections: unknown field in an override
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    message = " ".join(str(inner).split())
    print(f"error: unknown config field in the command line: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
