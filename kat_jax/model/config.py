"""Model configuration: one frozen dataclass shared by the decoder, checkpoints and presets."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
ATTENTION_BACKENDS = ("auto", "reference", "cudnn", "tree", "tree_mgpu")
# Fields that say how to run a model, not what it is: a checkpoint's config takes them from
# the run config (kat_jax.checkpoint.models.load_model).
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_unroll", "attention_backend")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen2.5-style dense decoder (docs/spec.md §1.1) plus the execution knobs kat_jax adds.

  Architecture fields mirror Hugging Face's `Qwen2Config`; `head_dim` defaults to
  `hidden_size // num_heads` as in transformers.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  qkv_bias: bool = True
  initializer_range: float = 0.02
  # Execution knobs (not part of the HF architecture).
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # dtype of the master parameters
  remat_policy: str = "none"
  scan_unroll: int = 1  # lax.scan unroll factor over layers; num_layers = fully unrolled
  attention_backend: str = "auto"

  def __post_init__(self):
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads};"
            " set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates half-pairs)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.attention_backend not in ATTENTION_BACKENDS:
      raise ValueError(
          f"attention_backend {self.attention_backend!r} not in {ATTENTION_BACKENDS}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} {getattr(self, name)!r} not in {tuple(DTYPES)}")
    if not 1 <= self.scan_unroll <= self.num_layers:
      raise ValueError(f"scan_unroll {self.scan_unroll} must be in [1, num_layers]")

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
    return cls(**values)

  def num_params(self) -> int:
    """Parameter count from the shapes (docs/spec.md §1.3), without building the model."""
    d, h, f = self.hidden_size, self.head_dim, self.intermediate_size
    q, kv = self.num_heads * h, self.num_kv_heads * h
    bias = (q + 2 * kv) if self.qkv_bias else 0
    per_layer = d * q + 2 * d * kv + bias + q * d + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else self.vocab_size * d
    return self.vocab_size * d + self.num_layers * per_layer + d + head


def model_fields(preset: str) -> Any:
  """`config.model` schema: a preset plus every ModelConfig field as an overridable placeholder
  (None = the preset's value); `kat_jax.checkpoint.models.config_from_model_fields` fills the dataclass."""
  from ml_collections import ConfigDict, config_dict  # pylint: disable=g-import-not-at-top
  model = ConfigDict({"preset": preset, "init_from": ""})
  for name, field in ModelConfig.__dataclass_fields__.items():
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(
        str(field.type).split(" ")[0].replace("'", ""), str)
    model[name] = config_dict.placeholder(kind)
  return model
