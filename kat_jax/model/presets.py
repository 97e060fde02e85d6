"""Named model presets: the Qwen2.5 sizes (docs/spec.md §1.2), KAT-V1-40B and a CPU-sized `tiny`."""

from __future__ import annotations

from typing import Any

from kat_jax.model.config import ModelConfig

_QWEN = dict(rope_theta=1_000_000.0, qkv_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    # CPU default: vocab 512 covers the byte tokenizer (256 bytes + 30 added tokens).
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=4096, **_QWEN),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, max_position_embeddings=131072, **_QWEN),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_layers=36, num_heads=16, num_kv_heads=2, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=32768, **_QWEN),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
    "qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                        num_layers=48, num_heads=40, num_kv_heads=8, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
    # Base-model values (rms_norm_eps 1e-5; the Instruct checkpoint uses 1e-6).
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_layers=64, num_heads=40, num_kv_heads=8, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
    "qwen2.5-72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_layers=80, num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, max_position_embeddings=131072, **_QWEN),
    # KAT-V1 report Table 1: 32B shapes, 80 layers, untied, 32K context.
    "kat-v1-40b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                       num_layers=80, num_heads=40, num_kv_heads=8, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, max_position_embeddings=32768, **_QWEN),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns the `ModelConfig` of a named preset, with field overrides (e.g. dtype='bfloat16')."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return ModelConfig.from_dict({**PRESETS[name], **overrides})
