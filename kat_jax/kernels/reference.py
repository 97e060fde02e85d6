"""Plain-JAX attention under the `kv_end` visibility rule (the reference every fast path matches).

A batch row is a flat token sequence; token `j` may be seen by queries `i` with
`j <= i < kv_end[j]`.  One document: `kv_end[j] = T`; packed documents: the end of j's
document; a prefix tree laid out depth-first: the end of the subtree of j's node.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_kv_end(batch: int, length: int) -> jax.Array:
  """`kv_end` of plain causal attention: every key is visible to the end of the row. [B,T] int32."""
  return jnp.full((batch, length), length, dtype=jnp.int32)


def visibility_mask(kv_end: jax.Array) -> jax.Array:
  """Boolean mask [B, Tq, Tk]: query i sees key j iff j <= i < kv_end[j]."""
  length = kv_end.shape[-1]
  q_idx = jnp.arange(length)[:, None]
  k_idx = jnp.arange(length)[None, :]
  return (k_idx <= q_idx) & (q_idx < kv_end[:, None, :])


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_end: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
  """Reference attention with the `kv_end` mask and grouped-query heads.

  Args:
    q: [B, T, Hq, D] queries.
    k: [B, T, Hkv, D] keys; Hq must be a multiple of Hkv (GQA).
    v: [B, T, Hkv, D] values.
    kv_end: [B, T] int32, one past the last query allowed to see each key.
    scale: softmax scale, default D**-0.5.

  Returns:
    [B, T, Hq, D] in q's dtype.  Softmax runs in float32; a query that sees no key
    (never the case for a well-formed row, where every token sees itself) returns zeros.
  """
  batch, length, num_q_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  if num_q_heads % num_kv_heads:
    raise ValueError(f"query heads {num_q_heads} not a multiple of kv heads {num_kv_heads}")
  groups = num_q_heads // num_kv_heads
  scale = head_dim**-0.5 if scale is None else scale
  qg = q.reshape(batch, length, num_kv_heads, groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  mask = visibility_mask(kv_end)[:, None, None, :, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(logits - row_max)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, length, num_q_heads, head_dim).astype(q.dtype)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Attention over a KV cache with an explicit mask (the sampler's XLA decode step).

  q [B,T,Hq,D], k/v cache [B,S,Hkv,D], mask [B,T,S] bool -> [B,T,Hq,D].

  Float32 scores and softmax like `attention_reference`; a query with no visible key (a
  padding slot) gets a uniform average instead of NaN, and nothing reads it.
  """
  batch, length, num_q_heads, head_dim = q.shape
  num_kv_heads = k_cache.shape[2]
  groups = num_q_heads // num_kv_heads
  qg = q.reshape(batch, length, num_kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k_cache,
                      preferred_element_type=jnp.float32) * head_dim**-0.5
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v_cache.dtype), v_cache,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, length, num_q_heads, head_dim).astype(q.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """The RMSNorm math as a function (the model, the KV-cache sampler and the fused decode
  kernels call it on raw weights)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * scale.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,T,H,D] rotated with the non-interleaved `rotate_half` convention."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
