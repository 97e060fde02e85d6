"""The one place that turns a model source into `(ModelConfig, params)`, and back to disk.

A model source (`spec`) is one of:

  * "hf": a Hugging Face Qwen2 directory (config.json + model.safetensors, or the sharded
    model.safetensors.index.json + shards; `kat_jax.checkpoint.hf`);
  * "run": a run workdir with `checkpoints/<step>/` written by `RunCheckpointer` (any
    training stage: pretrain, sft, step_srpo, a distill student or teacher run, ...). The
    latest complete step is loaded, or `step=`, or the spec `<workdir>@<step>`. The
    architecture comes from what the run saved: the checkpoint's `meta.model_config`, else
    `<workdir>/config.json`, else the run config's `model` fields (following its `init_from`
    or `rl.init_sft_workdir` to the model it started from);
  * "saved": a directory with `model_config.json` and Orbax params in `params/` (the distill
    stage's teacher and `<variant>/final`) or `orbax_params/` (the upscale stage's output);
  * "preset": a preset name (`kat_jax.model.PRESETS`) or a `ModelConfig`: a random init.

Errors are `ConfigError`s that name the spec (and `what`, the config field it came from).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from kat_jax.errors import ConfigError
from kat_jax.model import PRESETS, ModelConfig, get_preset, init_params
from kat_jax.model.config import EXECUTION_FIELDS

SOURCE_KINDS = ("hf", "run", "saved", "preset")
CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"  # what the training loop writes at the root of its workdir
MODEL_CONFIG_FILE = "model_config.json"
SAVED_PARAMS_DIRS = ("params", "orbax_params")  # distill's save_model, upscale's output
EXPORT_INFO_FILE = "kat_jax_export.json"  # what the export stage exported, incl. the tokenizer
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_STEP_SUFFIX = re.compile(r"^(?P<path>.+)@(?P<step>\d+)$")


def _fail(what: str, message: str) -> ConfigError:
  return ConfigError(f"{what}: {message}")


def split_step(spec: str) -> tuple[str, int | None]:
  """'runs/sft@200' -> ('runs/sft', 200); a spec without '@<digits>' (or an existing path
  that happens to end so) -> (spec, None)."""
  match = _STEP_SUFFIX.match(spec)
  if match and not os.path.exists(spec):
    return match["path"], int(match["step"])
  return spec, None


def _kind_of_directory(path: str) -> str | None:
  if (os.path.exists(os.path.join(path, "config.json"))
      and any(os.path.exists(os.path.join(path, f)) for f in _HF_WEIGHTS)):
    return "hf"
  if os.path.exists(os.path.join(path, MODEL_CONFIG_FILE)) and any(
      os.path.isdir(os.path.join(path, d)) for d in SAVED_PARAMS_DIRS):
    return "saved"
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    return "run"
  return None


def _loadable_inside(path: str) -> list[str]:
  """Subdirectories (two levels deep) that are model sources: a hint for a wrong directory."""
  found = []
  for root, dirs, _ in os.walk(path):
    depth = os.path.relpath(root, path).count(os.sep) + (root != path)
    if depth >= 2:
      dirs.clear()
      continue
    for d in sorted(dirs):
      if d != CHECKPOINTS_DIR and _kind_of_directory(os.path.join(root, d)):
        found.append(os.path.relpath(os.path.join(root, d), path))
  return sorted(found)


def model_source_kind(spec: str | ModelConfig, *, what: str = "model source") -> str:
  """One of `SOURCE_KINDS` for `spec` (see the module docstring); ConfigError otherwise."""
  if isinstance(spec, ModelConfig):
    return "preset"
  path, _ = split_step(spec)
  if os.path.isdir(path):
    kind = _kind_of_directory(path)
    if kind is None:
      inside = _loadable_inside(path)
      hint = f"; model sources inside it: {', '.join(inside)}" if inside else ""
      raise _fail(what, f"{path} is neither a Hugging Face directory (config.json + "
                  f"model.safetensors), a run workdir ({CHECKPOINTS_DIR}/) nor a saved "
                  f"model ({MODEL_CONFIG_FILE} + params/){hint}")
    if path != spec and kind != "run":
      raise _fail(what, f"{spec}: a step (@N) applies to run workdirs; {path} is a {kind} "
                  "directory")
    return kind
  if spec in PRESETS:
    return "preset"
  if os.path.exists(path):
    raise _fail(what, f"{path} is a file; give a model directory, run workdir or preset")
  raise _fail(what, f"no such path {path} (and not a preset name: {sorted(PRESETS)})")


# ---------------------------------------------------------------------------------------------
# Run workdirs


def _checkpoint_manager(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy)
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)  # Orbax needs absolute
  options = ocp.CheckpointManagerOptions(create=False, read_only=True)
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def run_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps of a run workdir, ascending (Orbax skips partial saves)."""
  with _checkpoint_manager(workdir) as manager:
    return sorted(manager.all_steps())


def resolve_step(workdir: str, step: int | None, *, what: str = "model source") -> int:
  """`step` if the run has it complete, else (step None) its latest complete step."""
  steps = run_steps(workdir)
  if not steps:
    raise _fail(what, f"no complete checkpoint under {os.path.join(workdir, CHECKPOINTS_DIR)}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise _fail(what, f"{workdir} has no complete checkpoint at step {step}; steps: {steps}")
  return step


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_meta(workdir: str, step: int) -> dict[str, Any]:
  """The JSON `meta` item `RunCheckpointer` saved with `step` ({} when there is none)."""
  path = os.path.join(workdir, CHECKPOINTS_DIR, str(step), "meta", "metadata")
  meta = _read_json(path) if os.path.exists(path) else {}
  return meta if isinstance(meta, dict) else {}


def saved_run_config(spec: str) -> dict[str, Any] | None:
  """The run config (as a dict) a run workdir saved, from `<workdir>/config.json` or its
  latest checkpoint's meta; None for other sources or when the run saved none."""
  if isinstance(spec, ModelConfig) or model_source_kind(spec) != "run":
    return None
  workdir, step = split_step(spec)
  candidates = []
  if os.path.exists(os.path.join(workdir, RUN_CONFIG_FILE)):
    candidates.append(_read_json(os.path.join(workdir, RUN_CONFIG_FILE)))
  steps = run_steps(workdir)
  if steps:
    candidates.append(run_meta(workdir, step if step in steps else steps[-1]))
  for saved in candidates:
    if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
      return saved["config"]
  return None


def source_tokenizer(spec: str | ModelConfig, *, what: str = "model source") -> str | None:
  """The tokenizer name a model source records: the `data.tokenizer` a run workdir trained
  with, or the one an exported HF directory names in `EXPORT_INFO_FILE`; else None."""
  kind = model_source_kind(spec, what=what)
  if kind == "run":
    return ((saved_run_config(spec) or {}).get("data") or {}).get("tokenizer")
  info = os.path.join(spec, EXPORT_INFO_FILE) if kind == "hf" else ""
  if info and os.path.exists(info):
    return _read_json(info).get("tokenizer")
  return None


def config_from_model_fields(model: Mapping[str, Any], *, what: str = "config.model"
                             ) -> ModelConfig:
  """`config.model`-style fields: a preset name plus ModelConfig fields (None = the preset's)."""
  overrides = {k: v for k, v in model.items()
               if k not in ("preset", "init_from") and v is not None}
  try:
    return get_preset(model["preset"], **overrides)
  except (KeyError, ValueError, TypeError) as e:
    raise _fail(what, str(e)) from e


def _run_model_config(workdir: str, step: int, what: str) -> ModelConfig:
  meta = run_meta(workdir, step)
  root = os.path.join(workdir, RUN_CONFIG_FILE)
  root_saved = _read_json(root) if os.path.exists(root) else {}
  for saved in (meta, root_saved):
    if isinstance(saved, dict) and isinstance(saved.get("model_config"), dict):
      return ModelConfig.from_dict(saved["model_config"])
  config = meta.get("config") if isinstance(meta.get("config"), dict) else None
  config = config or (root_saved.get("config") if isinstance(root_saved, dict) else None)
  if not config or not isinstance(config.get("model"), dict):
    raise _fail(what, f"{workdir} saved no model config (checkpoint meta or {RUN_CONFIG_FILE})")
  # Runs that saved only their run config: the model they started from sets the shapes.
  started_from = config["model"].get("init_from") or (config.get("rl") or {}).get(
      "init_sft_workdir")
  if started_from:
    return load_model_config(started_from, what=f"{workdir}'s starting model")
  return config_from_model_fields(config["model"], what=f"{workdir} config.model")


def _restore_run_params(workdir: str, step: int) -> dict:
  """Only the params of the saved train state (the optimizer state is not read)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  tree = getattr(metadata, "tree", metadata)
  if "params" not in tree:  # a state saved as the params tree itself
    return checkpointer.restore(path)
  target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                   tree["params"])}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return restored["params"]


# ---------------------------------------------------------------------------------------------
# Loading


def load_model_config(spec: str | ModelConfig, *, step: int | None = None,
                      what: str = "model source") -> ModelConfig:
  """The `ModelConfig` of a source without reading its weights."""
  kind = model_source_kind(spec, what=what)
  if kind == "preset":
    return spec if isinstance(spec, ModelConfig) else get_preset(spec)
  path, path_step = split_step(spec)
  if kind == "hf":
    from kat_jax.checkpoint import hf  # pylint: disable=g-import-not-at-top
    return hf.config_from_hf(hf.read_hf_config(path))
  if kind == "saved":
    return ModelConfig.from_dict(_read_json(os.path.join(path, MODEL_CONFIG_FILE)))
  step = resolve_step(path, step if step is not None else path_step, what=what)
  return _run_model_config(path, step, what)


def _with_execution(config: ModelConfig, execution: ModelConfig | None) -> ModelConfig:
  if execution is None:
    return config
  return config.replace(**{name: getattr(execution, name) for name in EXECUTION_FIELDS})


def _check_shapes(config: ModelConfig, params: Mapping, where: str, what: str) -> None:
  """The restored decoder params have the shapes `config` gives (a wrong config is caught
  here, not as a shape error deep inside the model)."""
  expected = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
  decoder = {k: v for k, v in params.items() if k != "mtp"}
  got = jax.tree_util.tree_flatten_with_path(decoder)[0]
  want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, leaf in got:
    if path in want and tuple(leaf.shape) != tuple(want[path].shape):
      raise _fail(what, f"{where}: parameter {jax.tree_util.keystr(path)} has shape "
                  f"{tuple(leaf.shape)}, but the saved model config gives "
                  f"{tuple(want[path].shape)}")
  missing = sorted(jax.tree_util.keystr(p) for p in set(want) - {p for p, _ in got})
  if missing:
    raise _fail(what, f"{where}: parameters missing: {missing[:5]}")


def _to_device(params: Any, dtype: Any) -> Any:
  def put(x):
    x = np.asarray(x)
    return jax.numpy.asarray(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x)
  return jax.tree.map(put, params)


def load_configured_model(model: Mapping[str, Any], *, seed: int = 0, mtp: bool = False,
                          tokenizer: Any = None) -> tuple[ModelConfig, dict]:
  """The model a run config's `model` fields name: `init_from` (any source, run with these
  fields' execution settings) or, when empty, a random init of the preset + overrides."""
  configured = config_from_model_fields(model)
  return load_model(model.get("init_from") or configured, execution=configured, seed=seed,
                    mtp=mtp, tokenizer=tokenizer,
                    what="config.model.init_from" if model.get("init_from") else "config.model")


def load_model(spec: str | ModelConfig, *, step: int | None = None,
               execution: ModelConfig | None = None, seed: int = 0, mtp: bool = False,
               tokenizer: Any = None, what: str = "model source") -> tuple[ModelConfig, dict]:
  """(model config, params) of any model source (module docstring).

  Args:
    spec: HF directory, run workdir (optionally `<workdir>@<step>`), saved-model directory,
      preset name or `ModelConfig` (the last two: random init from `seed`).
    step: the checkpoint step of a run workdir (default: its latest complete step).
    execution: a config whose execution fields (dtype, param_dtype, remat_policy, ...)
      replace the source's; params are cast to its `param_dtype`.
    seed: the random init's seed.
    mtp: keep the MTP heads (params["mtp"]) when the source has them (off: the stages that
      sample or evaluate the plain decoder do not want them).
    tokenizer: when given, `check_vocab` runs on the source's config before any weight is
      read (a mismatch costs no load time).
    what: the config field `spec` came from, for error messages.

  Returns:
    (config, params): params unboxed, on the default device, in the `Decoder` layout.
  """
  kind = model_source_kind(spec, what=what)
  if tokenizer is not None:
    check_vocab(load_model_config(spec, step=step, what=what), tokenizer, what=what)
  if kind == "preset":
    config = _with_execution(load_model_config(spec), execution)
    return config, jax.jit(lambda rng: init_params(config, rng))(jax.random.key(seed))
  path, path_step = split_step(spec)
  if kind == "hf":
    from kat_jax.checkpoint.hf import load_pretrained  # pylint: disable=g-import-not-at-top
    overrides = None if execution is None else {
        name: getattr(execution, name) for name in EXECUTION_FIELDS}
    try:
      return load_pretrained(path, config_overrides=overrides, load_mtp=mtp)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise _fail(what, f"{path}: {e}") from e
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if kind == "saved":
    config = load_model_config(path, what=what)
    params_dir = next(os.path.join(path, d) for d in SAVED_PARAMS_DIRS
                      if os.path.isdir(os.path.join(path, d)))
    params = ocp.StandardCheckpointer().restore(os.path.abspath(params_dir))
    where = params_dir
  else:
    step = resolve_step(path, step if step is not None else path_step, what=what)
    config = _run_model_config(path, step, what)
    params = _restore_run_params(path, step)
    where = os.path.join(path, CHECKPOINTS_DIR, str(step))
  config = _with_execution(config, execution)
  params = dict(params)
  if not mtp:
    params.pop("mtp", None)
  _check_shapes(config, params, where, what)
  return config, _to_device(params, config.weight_dtype)


# ---------------------------------------------------------------------------------------------
# Saving


def save_model(directory: str, config: ModelConfig, params: Mapping, *, dtype: Any = None,
               max_shard_size: int | str = "5GB") -> None:
  """Writes `directory` as a Hugging Face directory that `load_model` and transformers load
  (MTP heads, when params has them, go to mtp.safetensors; `kat_jax.checkpoint.hf`)."""
  from kat_jax.checkpoint.hf import save_pretrained  # pylint: disable=g-import-not-at-top
  save_pretrained(directory, config, params, dtype=dtype, max_shard_size=max_shard_size)


# ---------------------------------------------------------------------------------------------
# Model and tokenizer


def tokenizer_name(spec: str | ModelConfig, default: str = "", *, what: str = "model source"
                   ) -> str:
  """The tokenizer for a model source: the one a run workdir trained with; else `default`;
  else the Qwen tokenizer when the model's vocabulary holds it, the byte tokenizer if not."""
  saved = source_tokenizer(spec, what=what)
  if saved or default:
    return saved or default
  from kat_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  qwen_ids = tokenizer.QWEN25_NUM_BPE_TOKENS + len(tokenizer.ADDED_TOKENS)
  fits_qwen = load_model_config(spec, what=what).vocab_size >= qwen_ids
  return "qwen2.5" if fits_qwen else "bytes"


def check_vocab(model_config: ModelConfig, tokenizer: Any, *, what: str = "config.model"
                ) -> None:
  """A model must have an embedding row for every id `tokenizer` can produce: a smaller
  vocabulary (e.g. the 151,673-id Qwen tokenizer on the 512-row `tiny` preset) would index
  past the table and decode garbage. Larger is fine (Qwen pads to 151936 / 152064 rows)."""
  if model_config.vocab_size < tokenizer.vocab_size:
    raise _fail(what, f"the model's vocab_size {model_config.vocab_size} is smaller than the "
                f"{type(tokenizer).__name__}'s {tokenizer.vocab_size} ids; pick the tokenizer "
                "the model was trained with (config.data.tokenizer) or a matching model")
