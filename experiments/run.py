"""The one entry point: `python -m experiments.run --config experiments/configs/<name>.py`.

The config's `stage` field picks what runs; any field can be overridden on the command line
(`--config.train.steps=20`). Bad input ends with one `error:` line naming the field, file, line
or checkpoint, never a traceback: config mistakes exit 2; bad data, checkpoints and file-system
errors (missing, unreadable or full) exit 1. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from kat_jax.errors import ConfigError, InputError, RewardInfrastructureError

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


# Stages that score answers with the code sandbox or SymPy workers (tagging, RL rewards,
# evaluation): their reward infrastructure is checked before the stage starts.
REWARD_STAGES = ("sft", "step_srpo", "agentic_rl", "eval")


def run_stage(config) -> dict:
  """Runs `config.stage` and returns its final metrics."""
  if config.stage not in STAGES:
    raise ConfigError(f"config.stage {config.stage!r} not in {sorted(STAGES)}")
  module_name, fn_name = STAGES[config.stage].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config)


def check_workdir(workdir: str) -> None:
  """ConfigError unless `config.workdir` is (or can become) a directory this process can use."""
  path = os.path.abspath(workdir)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ConfigError(f"config.workdir {path} exists and is not a directory")
  if os.path.isdir(path) and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
    raise ConfigError(f"config.workdir {path} is not readable and writable by this user")


def os_error_text(error: OSError) -> str:
  """One line for a file-system error: what went wrong and the path(s) it concerns."""
  if error.errno is None or error.strerror is None:
    return " ".join(str(error).split())  # raised with our own message ("no config.json in d")
  paths = [os.fspath(p) for p in (error.filename, error.filename2) if p is not None]
  return f"{error.strerror}: {' -> '.join(map(str, paths))}" if paths else error.strerror


def _report(text: str) -> None:
  logging.flush()
  print(f"error: {text}", file=sys.stderr, flush=True)


def run(config: Any) -> int:
  """Runs `config.stage`; returns the exit status, after one `error:` line for bad input.

  0: done. 2: a config field is wrong. 1: bad data, an unusable checkpoint, a file-system
  error (missing, unreadable, no space left) or a reward sandbox that cannot run programs; the
  traceback is logged at --verbosity=1.
  """
  try:
    check_workdir(config.workdir)
    from kat_jax.parallel.distributed import initialize_distributed  # pylint: disable=g-import-not-at-top
    initialize_distributed(config.get("distributed"))
    if config.stage in REWARD_STAGES:  # seconds now, rather than after a model load + rollout
      from kat_jax.tasks.rewards import check_infrastructure  # pylint: disable=g-import-not-at-top
      check_infrastructure()
    run_stage(config)
  except ConfigError as e:
    _report(str(e))
    return 2
  except (InputError, OSError, RewardInfrastructureError) as e:
    logging.debug("bad input", exc_info=True)
    _report(os_error_text(e) if isinstance(e, OSError) else str(e))
    return 1
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter hides the progress line
  config = _CONFIG.value
  try:
    config.stage  # pylint: disable=pointless-statement; a failed load raises here
  except OSError as e:  # the config file is missing, a directory or unreadable
    cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
    reason = cause.strerror if cause is not None and cause.strerror else str(e).splitlines()[0]
    _report(f"config file {flags.FLAGS['config'].config_filename}: {reason}")
    sys.exit(2)
  sys.exit(run(config))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config-override mistakes reported on one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except SyntaxError as e:  # the config file is not Python
    print(f"error: config file {e.filename} line {e.lineno}: {e.msg}", file=sys.stderr)
  except (KeyError, AttributeError) as e:  # ml_collections: unknown field in an override
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    message = " ".join(str(inner).split())
    print(f"error: unknown config field in the command line: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
