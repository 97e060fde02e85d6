"""Depth up-scaling (KAT-V1 32B -> 40B): layer saturation analysis and layer duplication."""

from kat_jax.upscale.expand import (INITS, PLACEMENTS, SELECTIONS, LayerMap, make_layer_map,
                                    select_layers, select_top_k, select_uniform, select_window,
                                    upscale, upscale_config, upscale_params)
from kat_jax.upscale.saturation import (SaturationReport, analyze_saturation, plot_saturation,
                                        run_layers_with_stats)

__all__ = ["INITS", "PLACEMENTS", "SELECTIONS", "LayerMap", "make_layer_map", "select_layers",
           "select_top_k", "select_uniform", "select_window", "upscale", "upscale_config",
           "upscale_params", "SaturationReport", "analyze_saturation", "plot_saturation",
           "run_layers_with_stats"]
