"""Pieces of the `kv_end` tree-attention kernels shared by every backend
(`tree_attention_triton.py`, `tree_attention_tpu.py`; public API in `tree_attention.py`):
tile settings, the per-call block visit lists and the tile math (arrays in, arrays out).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)


class KernelTiles(NamedTuple):
  """Tile sizes (powers of two >= 16) and GPU launch parameters of one kernel."""
  block_q: int = 128
  block_k: int = 128
  num_warps: int | None = None  # GPU only; default 4 (D <= 64) or 8
  num_stages: int | None = None  # GPU only; default 2
  # Mosaic GPU's warp-specialised forward and dQ only: FlashAttention-3's ping-pong schedule
  # barrier (one consumer's softmax / dS arithmetic overlaps the other's matmuls).
  ping_pong: bool = False


class Tuning(NamedTuple):
  """Per-kernel tiles: forward, dQ and dK/dV."""
  fwd: KernelTiles = KernelTiles()
  dq: KernelTiles = KernelTiles()
  dkdv: KernelTiles = KernelTiles()


class KernelConfig(NamedTuple):
  """One call's static settings, passed to every kernel."""
  scale: float
  backend: str
  interpret: bool
  tuning: Tuning


# ------------------------------------------------------------------------------------------
# Block metadata (plain JAX, computed once per call).


def tile_classes(kv_end: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """Class of every (query block, key block) tile: 0 full, 1 partial, 2 hidden.

  Args:
    kv_end: [B, T] int32 with T a multiple of both block sizes.
  Returns:
    [B, T // block_q, T // block_k] int32.
  """
  batch, length = kv_end.shape
  nq, nk = length // block_q, length // block_k
  key_ends = kv_end.reshape(batch, nk, block_k)
  kmin = key_ends.min(-1)[:, None, :]
  kmax = key_ends.max(-1)[:, None, :]
  qs = (jnp.arange(nq) * block_q)[None, :, None]
  qe = qs + block_q
  ks = (jnp.arange(nk) * block_k)[None, None, :]
  ke = ks + block_k
  hidden = (ks > qe - 1) | (kmax <= qs)
  full = (ke - 1 <= qs) & (kmin >= qe)
  return jnp.where(hidden, 2, jnp.where(full, 0, 1)).astype(jnp.int32)


def visit_lists(classes: jax.Array) -> jax.Array:
  """[B, R, C] tile classes -> [B, R, 2 + C] int32 rows `[n_full, n_visible, c_0, c_1, ...]`.

  The column list holds full tiles first, then partial ones, then hidden ones (never visited).
  """
  order = jnp.argsort(classes, axis=-1, stable=True).astype(jnp.int32)
  n_full = jnp.sum(classes == 0, axis=-1, dtype=jnp.int32)[..., None]
  n_visible = jnp.sum(classes < 2, axis=-1, dtype=jnp.int32)[..., None]
  return jnp.concatenate([n_full, n_visible, order], axis=-1)


# ------------------------------------------------------------------------------------------
# Tile math shared by all kernels (arrays in, arrays out).


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, D] @ b[N, D].T -> [M, N] float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, N] -> [M, N] float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def tile_visible(q_start, k_start, key_ends: jax.Array, block_q: int, block_k: int):
  """[bq, bk] bool mask of a partial tile; key_ends [1, bk] int32."""
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return (k_pos <= q_pos) & (q_pos < key_ends)


def as_column(x: jax.Array) -> jax.Array:
  """Row statistics as a [rows, 1] column (GPU keeps them 1-D, TPU 2-D)."""
  return x if x.ndim == 2 else x[:, None]


def row_reduce(fn, s: jax.Array, like: jax.Array) -> jax.Array:
  """Row reduction of s [bq, bk] shaped like the statistic `like` ([bq] or [bq, 1])."""
  return fn(s, axis=1, keepdims=like.ndim == 2)


def online_softmax_step(q, k, v, carry, visible, logit_scale):
  """One FlashAttention tile update in base 2.  carry = (acc [bq,D], m, l) with m, l [bq] or
  [bq, 1]."""
  acc, m_prev, l_prev = carry
  s = dot_nt(q, k) * logit_scale
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  m_next = jnp.maximum(m_prev, row_reduce(jnp.max, s, m_prev))
  # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  alpha = jnp.exp2(m_prev - m_safe)
  p = jnp.exp2(s - as_column(m_safe))
  l_next = alpha * l_prev + row_reduce(jnp.sum, p, l_prev)
  acc = as_column(alpha) * acc + dot_nn(p.astype(v.dtype), v)
  return acc, m_next, l_next


def finalize(acc, m, l):
  """-> (out [bq, D] f32, lse like m, base 2; +inf for rows that saw no key)."""
  seen = l > 0.0
  out = acc / as_column(jnp.where(seen, l, 1.0))
  lse = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
  return out, lse


def tile_visible_t(q_start, k_start, key_ends: jax.Array, block_q: int, block_k: int):
  """Transposed partial-tile mask [bk, bq] (keys on rows); key_ends [bk, 1] int32."""
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
  return (k_pos <= q_pos) & (q_pos < key_ends)


def probs_and_dlogits_t(q, k, v, do, lse_row, delta_row, visible_t, logit_scale):
  """dK/dV tile in key-major orientation: P^T and dS^T [bk, bq] f32 (lse/delta rows [1, bq]).

  Keeping keys on rows lets dV += P^T dO and dK += dS^T Q feed the register tiles straight
  into the matmul (no register transposes, as in the Triton FlashAttention tutorial).
  """
  p_t = jnp.exp2(dot_nt(k, q) * logit_scale - lse_row)
  if visible_t is not None:
    p_t = jnp.where(visible_t, p_t, 0.0)
  dp_t = dot_nt(v, do)
  return p_t, p_t * (dp_t - delta_row)


def probs_and_dlogits(q, k, v, do, lse, delta, visible, logit_scale):
  """Backward tile: p [bq,bk] and dS [bq,bk] (w.r.t. the unscaled logits q.k), both f32."""
  p = jnp.exp2(dot_nt(q, k) * logit_scale - lse)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = dot_nt(do, v)
  return p, p * (dp - delta)
