"""Where the training stages get and put models: `(ModelConfig, params)` pairs.

Every stage loads through these functions, so switching the storage behind them is a change in
this file only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig, get_preset, init_params
from kat_jax.model.config import EXECUTION_FIELDS


def model_config_from(model_cfg: ConfigDict) -> ModelConfig:
  """`config.model`: a preset name plus any ModelConfig field left as None = preset value."""
  overrides = {k: v for k, v in model_cfg.items()
               if k not in ("preset", "init_from") and v is not None}
  try:
    return get_preset(model_cfg.preset, **overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def _load_hf(config: ConfigDict, model_config: ModelConfig) -> tuple[ModelConfig, Any]:
  """The HF checkpoint at `config.model.init_from`, run with `config.model`'s execution fields."""
  from kat_jax.checkpoint.hf import load_pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(config.model.init_from):
    raise ConfigError(f"config.model.init_from: no such directory {config.model.init_from}")
  overrides = {name: getattr(model_config, name) for name in EXECUTION_FIELDS}
  return load_pretrained(config.model.init_from, config_overrides=overrides)


def load_model(config: ConfigDict) -> tuple[ModelConfig, Any]:
  """(model config, params): `config.model.init_from` (HF dir) or a random init of the preset."""
  model_config = model_config_from(config.model)
  if config.model.init_from:
    return _load_hf(config, model_config)
  return model_config, init_params(model_config, jax.random.key(config.seed))


def initial_params(config: ConfigDict) -> tuple[ModelConfig, Any]:
  """(model config, host params) from `config.model.init_from`, or (config, None) = the
  trainer initialises the preset directly sharded."""
  model_config = model_config_from(config.model)
  if config.model.init_from:
    return _load_hf(config, model_config)
  return model_config, None


def load_run(config: ConfigDict, workdir: str) -> tuple[ModelConfig, Any]:
  """(model config, params) of the newest checkpoint a trainer run wrote under `workdir`."""
  if config.model.init_from:  # the architecture comes from the HF dir trained from
    model_config, _ = load_model(config)
  else:
    model_config = model_config_from(config.model)
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")  # Orbax needs absolute
  with ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.StandardCheckpointHandler()}) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  return model_config, params


def save_model(directory: str, config: ModelConfig, params: Any) -> None:
  """`<directory>/model_config.json` + `<directory>/params` (Orbax)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "model_config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(os.path.abspath(directory), "params"), params, force=True)
  checkpointer.wait_until_finished()


def load_saved(directory: str, field: str = "model directory") -> tuple[ModelConfig, Any]:
  """Loads `save_model` output, or a Hugging Face directory (config.json + safetensors)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, "model_config.json")):
    with open(os.path.join(directory, "model_config.json"), encoding="utf-8") as f:
      config = ModelConfig.from_dict(json.load(f))
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
    return config, params
  if os.path.exists(os.path.join(directory, "config.json")):
    from kat_jax.checkpoint.hf import load_pretrained  # pylint: disable=g-import-not-at-top
    return load_pretrained(directory)  # MTP heads stay on disk (load_mtp is opt-in)
  raise ConfigError(f"{field}: no model_config.json or config.json in {directory}")
