"""KV-cache generation for rollouts and evaluation (no grain / ml_collections imports here)."""

from kat_jax.sampling.autothink import (THINK_MODES, autothink_stats, forced_mode_prefix,
                                        think_mode_prompts)
from kat_jax.sampling.forward import (DecodeParams, decode_logical_axes, prepare_params,
                                     shard_decode_params)
from kat_jax.sampling.logits import GREEDY, SamplingParams
from kat_jax.sampling.sampler import (DecodeState, GenerationResult, Sampler, cache_logical_axes,
                                      fork, init_state)
from kat_jax.sampling.engine import Completion, Engine, EngineSampler, Request

__all__ = ["THINK_MODES", "autothink_stats", "forced_mode_prefix", "think_mode_prompts",
           "DecodeParams", "decode_logical_axes", "prepare_params", "shard_decode_params",
           "GREEDY", "SamplingParams", "DecodeState", "GenerationResult", "Sampler",
           "cache_logical_axes", "fork", "init_state", "Completion", "Engine", "EngineSampler",
           "Request"]
