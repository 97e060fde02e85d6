"""Attention kernels under the `kv_end` visibility rule (query i sees key j iff j <= i < kv_end[j])."""

from kat_jax.kernels.reference import attention_reference
from kat_jax.kernels.reference import causal_kv_end
from kat_jax.kernels.reference import visibility_mask
from kat_jax.kernels.tree_attention import DEFAULT_TUNING
from kat_jax.kernels.tree_attention import KernelTiles
from kat_jax.kernels.tree_attention import tile_classes
from kat_jax.kernels.tree_attention import tree_attention
from kat_jax.kernels.tree_attention import Tuning

__all__ = [
    "DEFAULT_TUNING",
    "KernelTiles",
    "Tuning",
    "attention_reference",
    "causal_kv_end",
    "tile_classes",
    "tree_attention",
    "visibility_mask",
]
