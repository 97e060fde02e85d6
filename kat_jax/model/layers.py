"""Building blocks of the Qwen2.5 decoder: RMSNorm, RoPE, SwiGLU MLP and GQA attention.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `norm`); `kat_jax.parallel` maps them onto mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from kat_jax.kernels.reference import apply_rope, rms_norm  # re-exported: the model uses them
from kat_jax.model.attention import attend
from kat_jax.model.config import ModelConfig


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...],
           config: ModelConfig) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, config.weight_dtype)


def _normal(config: ModelConfig):
  return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x²) + eps) in float32, cast back, then times `scale` (no 1+w offset)."""

  config: ModelConfig
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.config)
    return rms_norm(x, scale, self.eps)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """Half-split RoPE tables. positions [B,T] -> cos, sin [B,T,1,head_dim] in `dtype`.

  Computed in float32 and cast, as transformers does (docs/spec.md §1.1).
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.compute_dtype
    gate = _param(self, "gate_proj", _normal(cfg), (d, f), ("embed", "mlp"), cfg)
    up = _param(self, "up_proj", _normal(cfg), (d, f), ("embed", "mlp"), cfg)
    down = _param(self, "down_proj", _normal(cfg), (f, d), ("mlp", "embed"), cfg)
    g = jnp.einsum("btd,df->btf", x, gate.astype(dt))
    u = jnp.einsum("btd,df->btf", x, up.astype(dt))
    h = nn.with_logical_constraint(nn.silu(g) * u, ("activation_batch", "activation_length",
                                                    "activation_mlp"))
    return jnp.einsum("btf,fd->btd", h, down.astype(dt))


class Attention(nn.Module):
  """Grouped-query attention with q/k/v bias and no o_proj bias, under the `kv_end` mask."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               kv_end: jax.Array | None) -> jax.Array:
    """x [B,T,d]; cos/sin [B,T,1,D]; kv_end [B,T] int32 or None (plain causal) -> [B,T,d]."""
    cfg = self.config
    d, hq, hkv, hd, dt = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.compute_dtype)

    def project(name: str, heads: int, head_axis: str) -> jax.Array:
      w = _param(self, f"{name}_kernel", _normal(cfg), (d, heads, hd),
                 ("embed", head_axis, "head_dim"), cfg)
      y = jnp.einsum("btd,dhk->bthk", x, w.astype(dt))
      if cfg.qkv_bias:
        b = _param(self, f"{name}_bias", nn.initializers.zeros, (heads, hd),
                   (head_axis, "head_dim"), cfg)
        y = y + b.astype(dt)
      return y

    q = apply_rope(project("q", hq, "heads"), cos, sin)
    k = apply_rope(project("k", hkv, "kv_heads"), cos, sin)
    v = project("v", hkv, "kv_heads")
    out = attend(q, k, v, kv_end, backend=cfg.attention_backend)
    out = checkpoint_name(out, "attention_out")
    o = _param(self, "o_kernel", _normal(cfg), (hq, hd, d), ("heads", "head_dim", "embed"), cfg)
    return jnp.einsum("bthk,hkd->btd", out, o.astype(dt))
