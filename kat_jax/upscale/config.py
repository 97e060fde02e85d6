"""`config.upscale`: the schema, and the layer map it selects (`expand.LayerMap`).

Every bad field becomes one ConfigError here, before the (long) saturation analysis.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from kat_jax.errors import ConfigError
from kat_jax.upscale import expand


def upscale_fields() -> ConfigDict:
  """`config.upscale` defaults (the stage configs start from these)."""
  return ConfigDict(dict(
      num_new_layers=1,  # k: layers to duplicate (KAT: 16 of 64)
      selection="top_k",  # 'top_k' | 'window' | 'uniform' | 'explicit'
      layers="",  # comma-separated layer indices for selection='explicit'
      exclude_first=1,  # never duplicate the first / last few layers
      exclude_last=1,
      placement="interleave",  # 'interleave' | 'block'
      init="copy",  # 'copy' | 'identity' (zero o_kernel/down_proj of the copies)
      analyze=True,  # run the saturation analysis (needed by top_k/window)
      calibration_batches=8,
      check_batches=0,  # > 0: report the loss before/after on this many batches
      expected_num_layers=0,  # > 0: fail unless the new model has this many layers
      save_orbax=True,
      save_hf=True,
      hf_dtype="",  # dtype of the safetensors ('' = the model's param_dtype)
      max_shard_size="5GB",
  ))


def _parse_layers(text: str) -> list[int]:
  try:
    return [int(s) for s in text.replace(" ", "").split(",") if s]
  except ValueError:
    raise ValueError(f"layers {text!r} is not a comma-separated int list") from None


def choose_layer_map(up: ConfigDict, num_layers: int,
                     mean_cosine: list[float] | None) -> expand.LayerMap:
  """`config.upscale` + per-layer mean cosine -> the layer map (ConfigError on bad fields)."""
  try:
    if up.init not in expand.INITS:
      raise ValueError(f"unknown init {up.init!r}; choose one of {expand.INITS}")
    layers = _parse_layers(up.layers) if up.selection == "explicit" else []
    duplicated = expand.select_layers(
        up.selection, num_layers, up.num_new_layers, mean_cosine=mean_cosine, layers=layers,
        exclude_first=up.exclude_first, exclude_last=up.exclude_last)
    layer_map = expand.make_layer_map(num_layers, duplicated, up.placement)
  except ValueError as e:
    raise ConfigError(f"config.upscale: {e}") from e
  if up.expected_num_layers and layer_map.new_num_layers != up.expected_num_layers:
    raise ConfigError(f"config.upscale.expected_num_layers is {up.expected_num_layers} but the"
                      f" layer map has {layer_map.new_num_layers} layers")
  return layer_map


def check_upscale_fields(up: ConfigDict, num_layers: int) -> None:
  """Fails fast, before the (long) analysis, on fields that cannot work for any cosines."""
  if up.selection in ("top_k", "window") and not up.analyze:
    raise ConfigError(f"config.upscale.selection {up.selection!r} needs upscale.analyze=True")
  if up.analyze and up.calibration_batches < 1:
    raise ConfigError(f"config.upscale.calibration_batches must be >= 1, got "
                      f"{up.calibration_batches}")
  # A flat profile: top_k picks the first candidates, a contiguous run, so block placement
  # passes here; whether the measured top-k is contiguous is only known after the analysis.
  choose_layer_map(up, num_layers, [0.0] * num_layers)
