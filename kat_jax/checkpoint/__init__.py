"""Checkpoints: Hugging Face safetensors import/export (and Orbax train state)."""

from kat_jax.checkpoint.hf import config_from_hf, config_to_hf, load_pretrained, save_pretrained

__all__ = ["config_from_hf", "config_to_hf", "load_pretrained", "save_pretrained"]
