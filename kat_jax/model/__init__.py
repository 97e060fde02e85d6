"""Qwen2.5-style decoder, presets and attention dispatch."""

from kat_jax.model.config import ModelConfig
from kat_jax.model.decoder import (Decoder, init_params, lm_head_kernel, logical_axes,
                                   param_shapes)
from kat_jax.model.presets import PRESETS, get_preset

__all__ = ["ModelConfig", "Decoder", "init_params", "lm_head_kernel", "logical_axes",
           "param_shapes", "PRESETS", "get_preset"]
