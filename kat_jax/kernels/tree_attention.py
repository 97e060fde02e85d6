"""Block-sparse Pallas attention under the `kv_end` visibility rule (prefix trees, packed docs).

Query `i` attends key `j` iff `j <= i < kv_end[j]` (see `reference.py`).  The sequence is cut
into query blocks `[qs, qe)` and key blocks `[ks, ke)`.  From the per-key-block min / max of
`kv_end` every tile is classed once, outside the kernels:

  hidden   ks > qe - 1  or  max(kv_end[ks:ke]) <= qs          -> never touched
  full     ke - 1 <= qs and min(kv_end[ks:ke]) >= qe          -> no mask arithmetic
  partial  otherwise                                           -> element mask

Each query block (and, for dK/dV, each key block) gets a compact list of its visible partner
blocks, full ones first, so the kernels loop only over visible tiles: hidden tiles cost nothing.

Backends (`backend=`):
  'gpu'  Pallas on Triton; layout stays [B, T, H, D]; one program per (query block, batch, head)
         loops over its visible key blocks (online softmax in float32, FlashAttention-2 style).
  'tpu'  Pallas Mosaic TPU; layout [B, H, T, D]; the visible-block lists go in as scalar
         prefetch and drive the BlockSpec index maps, the innermost grid axis walks the list
         (steps past its end repeat the last block index, so no DMA, and skip compute).
Both run on CPU with `interpret=True` (the tests do).  The backward pass is two kernels: dQ
(per query block, like the forward) and dK/dV (per key block, looping over the group's query
heads and the visible query blocks), with `delta = rowsum(dO * O)` computed in plain JAX.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_LOG2E = math.log2(math.e)
_BACKENDS = ("auto", "gpu", "tpu")


class KernelTiles(NamedTuple):
  """Tile sizes (powers of two >= 16) and Triton launch parameters of one kernel."""
  block_q: int = 128
  block_k: int = 128
  num_warps: int | None = None  # GPU only; default 4 (D <= 64) or 8
  num_stages: int | None = None  # GPU only; default 2


class Tuning(NamedTuple):
  """Per-kernel tiles: forward, dQ and dK/dV."""
  fwd: KernelTiles = KernelTiles()
  dq: KernelTiles = KernelTiles()
  dkdv: KernelTiles = KernelTiles()


# Measured on an H100 (benchmarks/tree_attention.py, docs/tree_attention.md): 128x128 forward
# tiles with 8 warps; 64x64 backward tiles with 4 warps (larger dK/dV tiles spill registers).
DEFAULT_TUNING = Tuning(fwd=KernelTiles(128, 128, 8, 2), dq=KernelTiles(64, 64, 4, 2),
                        dkdv=KernelTiles(64, 64, 4, 2))
# float32 tiles take twice the shared memory: 128x128 forward tiles with D=128 overflow the
# H100's 227 KiB (measured), so 4-byte inputs with D > 64 default to 64x64 tiles everywhere.
# (f32, D=64 with DEFAULT_TUNING is verified on the H100; f32 D=128 with these tiles is not.)
DEFAULT_TUNING_F32_WIDE = Tuning(*(KernelTiles(64, 64, 4, 2),) * 3)


class _Config(NamedTuple):
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


def _visit_lists(classes: jax.Array) -> jax.Array:
  """[B, R, C] tile classes -> [B, R, 2 + C] int32 rows `[n_full, n_visible, c_0, c_1, ...]`.

  The column list holds full tiles first, then partial ones, then hidden ones (never visited).
  """
  order = jnp.argsort(classes, axis=-1, stable=True).astype(jnp.int32)
  n_full = jnp.sum(classes == 0, axis=-1, dtype=jnp.int32)[..., None]
  n_visible = jnp.sum(classes < 2, axis=-1, dtype=jnp.int32)[..., None]
  return jnp.concatenate([n_full, n_visible, order], axis=-1)


# ------------------------------------------------------------------------------------------
# Tile math shared by all kernels (arrays in, arrays out).


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, D] @ b[N, D].T -> [M, N] float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, N] -> [M, N] float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _tile_visible(q_start, k_start, key_ends: jax.Array, block_q: int, block_k: int):
  """[bq, bk] bool mask of a partial tile; key_ends [1, bk] int32."""
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  return (k_pos <= q_pos) & (q_pos < key_ends)


def _col(x: jax.Array) -> jax.Array:
  """Row statistics as a [rows, 1] column (GPU keeps them 1-D, TPU 2-D)."""
  return x if x.ndim == 2 else x[:, None]


def _row_reduce(fn, s: jax.Array, like: jax.Array) -> jax.Array:
  """Row reduction of s [bq, bk] shaped like the statistic `like` ([bq] or [bq, 1])."""
  return fn(s, axis=1, keepdims=like.ndim == 2)


def _online_softmax_step(q, k, v, carry, visible, logit_scale):
  """One FlashAttention tile update in base 2.  carry = (acc [bq,D], m, l) with m, l [bq] or
  [bq, 1]."""
  acc, m_prev, l_prev = carry
  s = _dot_nt(q, k) * logit_scale
  if visible is not None:
    s = jnp.where(visible, s, -jnp.inf)
  m_next = jnp.maximum(m_prev, _row_reduce(jnp.max, s, m_prev))
  # A row that has seen no key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  alpha = jnp.exp2(m_prev - m_safe)
  p = jnp.exp2(s - _col(m_safe))
  l_next = alpha * l_prev + _row_reduce(jnp.sum, p, l_prev)
  acc = _col(alpha) * acc + _dot_nn(p.astype(v.dtype), v)
  return acc, m_next, l_next


def _finalize(acc, m, l):
  """-> (out [bq, D] f32, lse like m, base 2; +inf for rows that saw no key)."""
  seen = l > 0.0
  out = acc / _col(jnp.where(seen, l, 1.0))
  lse = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
  return out, lse


def _tile_visible_t(q_start, k_start, key_ends: jax.Array, block_q: int, block_k: int):
  """Transposed partial-tile mask [bk, bq] (keys on rows); key_ends [bk, 1] int32."""
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
  return (k_pos <= q_pos) & (q_pos < key_ends)


def _probs_and_dlogits_t(q, k, v, do, lse_row, delta_row, visible_t, logit_scale):
  """dK/dV tile in key-major orientation: P^T and dS^T [bk, bq] f32 (lse/delta rows [1, bq]).

  Keeping keys on rows lets dV += P^T dO and dK += dS^T Q feed the register tiles straight
  into the matmul (no register transposes, as in the Triton FlashAttention tutorial).
  """
  p_t = jnp.exp2(_dot_nt(k, q) * logit_scale - lse_row)
  if visible_t is not None:
    p_t = jnp.where(visible_t, p_t, 0.0)
  dp_t = _dot_nt(v, do)
  return p_t, p_t * (dp_t - delta_row)


def _probs_and_dlogits(q, k, v, do, lse, delta, visible, logit_scale):
  """Backward tile: p [bq,bk] and dS [bq,bk] (w.r.t. the unscaled logits q.k), both f32."""
  p = jnp.exp2(_dot_nt(q, k) * logit_scale - lse)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  dp = _dot_nt(do, v)
  return p, p * (dp - delta)


# ------------------------------------------------------------------------------------------
# GPU (Triton) kernels: layout [B, T, H, D], loops inside the kernel.


def _gpu_fwd_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg, nq):
  bq, bk, head_dim = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k, q_ref.shape[-1]
  qb = nq - 1 - pl.program_id(0)  # heaviest query blocks (latest) first
  q_start = qb * bq
  q = q_ref[...]
  logit_scale = cfg.scale * _LOG2E

  def step(j, carry, masked):
    k_start = pl.multiple_of(meta_ref[2 + j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    visible = None
    if masked:
      key_ends = kv_end_ref[pl.ds(k_start, bk)][None, :]
      visible = _tile_visible(q_start, k_start, key_ends, bq, bk)
    return _online_softmax_step(q, k, v, carry, visible, logit_scale)

  carry = (jnp.zeros((bq, head_dim), jnp.float32),
           jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  n_full, n_visible = meta_ref[0], meta_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)
  out, lse = _finalize(*carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _gpu_dq_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, *, cfg, nq):
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  qb = nq - 1 - pl.program_id(0)
  q_start = qb * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  logit_scale = cfg.scale * _LOG2E

  def step(j, dq, masked):
    k_start = pl.multiple_of(meta_ref[2 + j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    visible = None
    if masked:
      key_ends = kv_end_ref[pl.ds(k_start, bk)][None, :]
      visible = _tile_visible(q_start, k_start, key_ends, bq, bk)
    _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, visible, logit_scale)
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  n_full, n_visible = meta_ref[0], meta_ref[1]
  dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _gpu_dkdv_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                     dk_ref, dv_ref, *, cfg, groups):
  bq, bk = cfg.tuning.dkdv.block_q, cfg.tuning.dkdv.block_k
  kb = pl.program_id(0)
  k_start = kb * bk
  k, v = k_ref[...], v_ref[...]
  key_ends = kv_end_ref[...][:, None]
  logit_scale = cfg.scale * _LOG2E

  def head_rows(ref, rows, g):
    # q / dO blocks hold the whole group: [T, groups, D] (or [T, D] without GQA).
    return ref[rows, :] if groups == 1 else ref[rows, g, :]

  def step(j, carry, g, masked):
    dk, dv = carry
    q_start = pl.multiple_of(meta_ref[2 + j] * bq, bq)
    rows = pl.ds(q_start, bq)
    q, do = head_rows(q_ref, rows, g), head_rows(do_ref, rows, g)
    lse_row = lse_ref[rows] if groups == 1 else lse_ref[g, rows]
    delta_row = delta_ref[rows] if groups == 1 else delta_ref[g, rows]
    visible_t = _tile_visible_t(q_start, k_start, key_ends, bq, bk) if masked else None
    p_t, ds_t = _probs_and_dlogits_t(q, k, v, do, lse_row[None, :], delta_row[None, :],
                                     visible_t, logit_scale)
    dv = dv + _dot_nn(p_t.astype(do.dtype), do)
    dk = dk + _dot_nn(ds_t.astype(q.dtype), q)
    return dk, dv

  n_full, n_visible = meta_ref[0], meta_ref[1]

  def group_step(g, carry):
    carry = lax.fori_loop(0, n_full, functools.partial(step, g=g, masked=False), carry)
    return lax.fori_loop(n_full, n_visible, functools.partial(step, g=g, masked=True), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = (zeros, zeros)
  if groups == 1:
    carry = group_step(0, carry)
  else:
    carry = lax.fori_loop(0, groups, group_step, carry)
  dk, dv = carry
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_compiler_params(cfg: _Config, tiles: KernelTiles, head_dim: int):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  num_warps = tiles.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages or 2)


def _gpu_forward(q, k, v, kv_end, cfg: _Config):
  """q [B,T,Hq,D], k/v [B,T,Hkv,D], kv_end [B,T] (T padded) -> o [B,T,Hq,D], lse [B,Hq,T]."""
  batch, length, num_q_heads, head_dim = q.shape
  groups = num_q_heads // k.shape[2]
  bq, bk = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k
  nq = length // bq
  meta = _visit_lists(tile_classes(kv_end, bq, bk))
  grid = (nq, batch, num_q_heads)
  q_block = lambda i, b, h: (b, nq - 1 - i, h, 0)
  kv_block = lambda i, b, h: (b, 0, h // groups, 0)
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, cfg=cfg, nq=nq),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, None, meta.shape[-1]), lambda i, b, h: (b, nq - 1 - i, 0)),
          pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, bq, None, head_dim), q_block),
          pl.BlockSpec((None, length, None, head_dim), kv_block),
          pl.BlockSpec((None, length, None, head_dim), kv_block),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, head_dim), q_block),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q_heads, length), jnp.float32)],
      compiler_params=_gpu_compiler_params(cfg, cfg.tuning.fwd, head_dim),
      interpret=cfg.interpret,
      name="tree_attention_fwd",
  )(meta, kv_end, q, k, v)


def _gpu_backward(q, k, v, kv_end, do, lse, delta, cfg: _Config):
  """Padded tensors in, (dq, dk, dv) out; lse/delta [B, Hq, T] f32."""
  batch, length, num_q_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_q_heads // num_kv_heads
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  nq = length // bq
  meta_q = _visit_lists(tile_classes(kv_end, bq, bk))

  q_block = lambda i, b, h: (b, nq - 1 - i, h, 0)
  kv_whole = lambda i, b, h: (b, 0, h // groups, 0)
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg, nq=nq),
      grid=(nq, batch, num_q_heads),
      in_specs=[
          pl.BlockSpec((None, None, meta_q.shape[-1]), lambda i, b, h: (b, nq - 1 - i, 0)),
          pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
          pl.BlockSpec((None, bq, None, head_dim), q_block),
          pl.BlockSpec((None, length, None, head_dim), kv_whole),
          pl.BlockSpec((None, length, None, head_dim), kv_whole),
          pl.BlockSpec((None, bq, None, head_dim), q_block),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i)),
      ],
      out_specs=pl.BlockSpec((None, bq, None, head_dim), q_block),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_compiler_params(cfg, cfg.tuning.dq, head_dim),
      interpret=cfg.interpret,
      name="tree_attention_dq",
  )(meta_q, kv_end, q, k, v, do, lse, delta)

  bq, bk = cfg.tuning.dkdv.block_q, cfg.tuning.dkdv.block_k
  nk = length // bk
  meta_k = _visit_lists(jnp.swapaxes(tile_classes(kv_end, bq, bk), 1, 2))

  group_dim = None if groups == 1 else groups
  q_group = (None, length, group_dim, head_dim)
  stat_group = (None, None, length) if groups == 1 else (None, groups, length)
  k_block = lambda i, b, h: (b, i, h, 0)
  q_whole = lambda i, b, h: (b, 0, h, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkdv_kernel, cfg=cfg, groups=groups),
      grid=(nk, batch, num_kv_heads),
      in_specs=[
          pl.BlockSpec((None, None, meta_k.shape[-1]), lambda i, b, h: (b, i, 0)),
          pl.BlockSpec((None, bk), lambda i, b, h: (b, i)),
          pl.BlockSpec(q_group, q_whole),
          pl.BlockSpec((None, bk, None, head_dim), k_block),
          pl.BlockSpec((None, bk, None, head_dim), k_block),
          pl.BlockSpec(q_group, q_whole),
          pl.BlockSpec(stat_group, lambda i, b, h: (b, h, 0)),
          pl.BlockSpec(stat_group, lambda i, b, h: (b, h, 0)),
      ],
      out_specs=[pl.BlockSpec((None, bk, None, head_dim), k_block),
                 pl.BlockSpec((None, bk, None, head_dim), k_block)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_compiler_params(cfg, cfg.tuning.dkdv, head_dim),
      interpret=cfg.interpret,
      name="tree_attention_dkdv",
  )(meta_k, kv_end, q, k, v, do, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels: layout [B, H, T, D]; the visit lists are scalar-prefetched and the last
# grid axis walks them, accumulating in VMEM scratch.


def _tpu_interpret_arg(interpret: bool):
  if not interpret:
    return False
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  if hasattr(pltpu, "InterpretParams"):
    return pltpu.InterpretParams()
  return True


def _tpu_compiler_params(dims: tuple[str, ...]):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return pltpu.CompilerParams(dimension_semantics=dims)


def _list_entry(meta_ref, b, row, j):
  """Block index of visit step j; steps past the list repeat its last entry (no new DMA)."""
  last = jnp.maximum(meta_ref[b, row, 1] - 1, 0)
  return meta_ref[b, row, 2 + jnp.minimum(j, last)]


def _tpu_fwd_kernel(meta_ref, q_ref, k_ref, v_ref, kv_end_ref, o_ref, lse_ref, acc_ref, m_ref,
                    l_ref, *, cfg, nk):
  b, qb, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k
  n_full, n_visible = meta_ref[b, qb, 0], meta_ref[b, qb, 1]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  def step(masked):
    k_start = _list_entry(meta_ref, b, qb, j) * bk
    visible = None
    if masked:
      visible = _tile_visible(qb * bq, k_start, kv_end_ref[...], bq, bk)
    carry = (acc_ref[...], m_ref[...], l_ref[...])
    acc, m, l = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], carry, visible,
                                     cfg.scale * _LOG2E)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n_visible))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _write():
    out, lse = _finalize(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(meta_ref, q_ref, k_ref, v_ref, kv_end_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, acc_ref, *, cfg, nk):
  b, qb, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  n_full, n_visible = meta_ref[b, qb, 0], meta_ref[b, qb, 1]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    k_start = _list_entry(meta_ref, b, qb, j) * bk
    visible = None
    if masked:
      visible = _tile_visible(qb * bq, k_start, kv_end_ref[...], bq, bk)
    k = k_ref[...]
    _, ds = _probs_and_dlogits(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], visible, cfg.scale * _LOG2E)
    acc_ref[...] += _dot_nn(ds.astype(k.dtype), k)

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n_visible))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _write():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _tpu_dkdv_kernel(meta_ref, q_ref, k_ref, v_ref, kv_end_ref, do_ref, lse_ref, delta_ref,
                     dk_ref, dv_ref, dk_acc, dv_acc, *, cfg, nq, groups):
  b, kb, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  j = t % nq  # the last axis walks (group head, visit step) pairs
  bq, bk = cfg.tuning.dkdv.block_q, cfg.tuning.dkdv.block_k
  n_full, n_visible = meta_ref[b, kb, 0], meta_ref[b, kb, 1]

  @pl.when(t == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked):
    q_start = _list_entry(meta_ref, b, kb, j) * bq
    visible_t = None
    if masked:
      visible_t = _tile_visible_t(q_start, kb * bk, kv_end_ref[...], bq, bk)
    q, do = q_ref[...], do_ref[...]
    p_t, ds_t = _probs_and_dlogits_t(q, k_ref[...], v_ref[...], do, lse_ref[...],
                                     delta_ref[...], visible_t, cfg.scale * _LOG2E)
    dv_acc[...] += _dot_nn(p_t.astype(do.dtype), do)
    dk_acc[...] += _dot_nn(ds_t.astype(q.dtype), q)

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n_visible))(lambda: step(True))

  @pl.when(t == groups * nq - 1)
  def _write():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _tpu_forward(q, k, v, kv_end, cfg: _Config):
  """q [B,Hq,T,D], k/v [B,Hkv,T,D], kv_end [B,T] -> o [B,Hq,T,D], lse [B,Hq,T,1] (base 2)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, num_q_heads, length, head_dim = q.shape
  groups = num_q_heads // k.shape[1]
  bq, bk = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k
  nq, nk = length // bq, length // bk
  meta = _visit_lists(tile_classes(kv_end, bq, bk))
  kv_end3 = kv_end[:, None, :]  # [B, 1, T]: a (1, bk) block is legal on Mosaic TPU

  def kv_index(b, h, i, j, meta_ref):
    return b, h // groups, _list_entry(meta_ref, b, i, j), 0

  def kv_end_index(b, h, i, j, meta_ref):
    return b, 0, _list_entry(meta_ref, b, i, j)

  q_index = lambda b, h, i, j, meta_ref: (b, h, i, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(batch, num_q_heads, nq, nk),
      in_specs=[
          pl.BlockSpec((None, None, bq, head_dim), q_index),
          pl.BlockSpec((None, None, bk, head_dim), kv_index),
          pl.BlockSpec((None, None, bk, head_dim), kv_index),
          pl.BlockSpec((None, 1, bk), kv_end_index),
      ],
      out_specs=[
          pl.BlockSpec((None, None, bq, head_dim), q_index),
          pl.BlockSpec((None, None, bq, 1), q_index),
      ],
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg, nk=nk),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_q_heads, length, 1), jnp.float32)],
      compiler_params=_tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret_arg(cfg.interpret),
      name="tree_attention_fwd_tpu",
  )(meta, q, k, v, kv_end3)


def _tpu_backward(q, k, v, kv_end, do, lse, delta, cfg: _Config):
  """[B,H,T,D] tensors, lse/delta [B,Hq,T,1] f32 -> (dq, dk, dv)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, num_q_heads, length, head_dim = q.shape
  num_kv_heads = k.shape[1]
  groups = num_q_heads // num_kv_heads
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  nq, nk = length // bq, length // bk
  meta_q = _visit_lists(tile_classes(kv_end, bq, bk))
  kv_end3 = kv_end[:, None, :]
  interpret = _tpu_interpret_arg(cfg.interpret)
  semantics = _tpu_compiler_params(("parallel", "parallel", "parallel", "arbitrary"))

  q_index = lambda b, h, i, j, m: (b, h, i, 0)
  kv_index = lambda b, h, i, j, m: (b, h // groups, _list_entry(m, b, i, j), 0)
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_q_heads, nq, nk),
          in_specs=[
              pl.BlockSpec((None, None, bq, head_dim), q_index),
              pl.BlockSpec((None, None, bk, head_dim), kv_index),
              pl.BlockSpec((None, None, bk, head_dim), kv_index),
              pl.BlockSpec((None, 1, bk), lambda b, h, i, j, m: (b, 0, _list_entry(m, b, i, j))),
              pl.BlockSpec((None, None, bq, head_dim), q_index),
              pl.BlockSpec((None, None, bq, 1), q_index),
              pl.BlockSpec((None, None, bq, 1), q_index),
          ],
          out_specs=pl.BlockSpec((None, None, bq, head_dim), q_index),
          scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=semantics,
      interpret=interpret,
      name="tree_attention_dq_tpu",
  )(meta_q, q, k, v, kv_end3, do, lse, delta)

  bq, bk = cfg.tuning.dkdv.block_q, cfg.tuning.dkdv.block_k
  nq, nk = length // bq, length // bk
  meta_k = _visit_lists(jnp.swapaxes(tile_classes(kv_end, bq, bk), 1, 2))

  def q_side(b, h, i, t, m):
    return b, h * groups + t // nq, _list_entry(m, b, i, t % nq), 0

  def q_side_row(b, h, i, t, m):  # lse / delta as lane-major rows [B, Hq, 1, T]
    return b, h * groups + t // nq, 0, _list_entry(m, b, i, t % nq)

  k_index = lambda b, h, i, t, m: (b, h, i, 0)
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkdv_kernel, cfg=cfg, nq=nq, groups=groups),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(batch, num_kv_heads, nk, groups * nq),
          in_specs=[
              pl.BlockSpec((None, None, bq, head_dim), q_side),
              pl.BlockSpec((None, None, bk, head_dim), k_index),
              pl.BlockSpec((None, None, bk, head_dim), k_index),
              pl.BlockSpec((None, bk, 1), lambda b, h, i, t, m: (b, i, 0)),
              pl.BlockSpec((None, None, bq, head_dim), q_side),
              pl.BlockSpec((None, None, 1, bq), q_side_row),
              pl.BlockSpec((None, None, 1, bq), q_side_row),
          ],
          out_specs=[pl.BlockSpec((None, None, bk, head_dim), k_index),
                     pl.BlockSpec((None, None, bk, head_dim), k_index)],
          scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32),
                          pltpu.VMEM((bk, head_dim), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=semantics,
      interpret=interpret,
      name="tree_attention_dkdv_tpu",
  )(meta_k, q, k, v, kv_end[:, :, None], do, jnp.swapaxes(lse, 2, 3),
    jnp.swapaxes(delta, 2, 3))
  return dq, dk, dv


# ------------------------------------------------------------------------------------------
# custom_vjp wiring.  Inputs here are already padded to a multiple of every block size.


def _to_heads_major(x):
  return jnp.swapaxes(x, 1, 2)


def _forward(q, k, v, kv_end, cfg: _Config):
  """-> (out [B,T,Hq,D], lse [B,Hq,T] f32 base 2)."""
  if cfg.backend == "tpu":
    out, lse = _tpu_forward(_to_heads_major(q), _to_heads_major(k), _to_heads_major(v),
                            kv_end, cfg)
    return _to_heads_major(out), lse[..., 0]
  return _gpu_forward(q, k, v, kv_end, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tree_attention(q, k, v, kv_end, cfg: _Config):
  return _forward(q, k, v, kv_end, cfg)[0]


def _tree_attention_fwd(q, k, v, kv_end, cfg: _Config):
  out, lse = _forward(q, k, v, kv_end, cfg)
  return out, (q, k, v, kv_end, out, lse)


def _tree_attention_bwd(cfg: _Config, residuals, d_out):
  q, k, v, kv_end, out, lse = residuals
  # delta_i = sum_d dO * O: the softmax-Jacobian term, one cheap fused pass in XLA.
  delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_out = d_out.astype(q.dtype)
  if cfg.backend == "tpu":
    t = _to_heads_major
    dq, dk, dv = _tpu_backward(t(q), t(k), t(v), kv_end, t(d_out), lse[..., None],
                               delta[..., None], cfg)
    dq, dk, dv = t(dq), t(dk), t(dv)
  else:
    dq, dk, dv = _gpu_backward(q, k, v, kv_end, d_out, lse, delta, cfg)
  return dq, dk, dv, None


_tree_attention.defvjp(_tree_attention_fwd, _tree_attention_bwd)


# ------------------------------------------------------------------------------------------
# Public entry point.


def _resolve_backend(backend: str) -> str:
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  return "tpu" if jax.default_backend() == "tpu" else "gpu"


def _check_block(name: str, size: int):
  if size < 16 or size & (size - 1):
    raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def _validate(q, k, v, kv_end):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  batch, length, num_q_heads, head_dim = q.shape
  if k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
    raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, length or head dim")
  if num_q_heads % k.shape[2]:
    raise ValueError(f"query heads {num_q_heads} not a multiple of kv heads {k.shape[2]}")
  if head_dim & (head_dim - 1) or head_dim < 16:
    raise ValueError(f"head dim must be a power of two >= 16, got {head_dim}")
  if kv_end.shape != (batch, length):
    raise ValueError(f"kv_end must be [B, T] = {(batch, length)}, got {kv_end.shape}")
  if not jnp.issubdtype(kv_end.dtype, jnp.integer):
    raise ValueError(f"kv_end must be an integer array, got {kv_end.dtype}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _pad_length(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = length - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def tree_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_end: jax.Array,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    tuning: Tuning | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Block-sparse attention where query i sees key j iff j <= i < kv_end[j].

  Args:
    q: [B, T, Hq, D] queries (bf16 or f32; D a power of two, e.g. 64 or 128).
    k: [B, T, Hkv, D] keys; Hq a multiple of Hkv (grouped-query attention).
    v: [B, T, Hkv, D] values.
    kv_end: [B, T] int32, one past the last query allowed to see each key.
    scale: softmax scale, default D**-0.5.
    block_q, block_k: tile sizes (powers of two >= 16) of all three kernels; when both are
      None, `tuning` (default `DEFAULT_TUNING`) sets them per kernel.  T is padded to a
      multiple of every block size.
    tuning: per-kernel tiles and Triton launch parameters (see `Tuning`); exclusive with
      block_q / block_k.
    backend: 'auto' (TPU if the default backend is TPU, else GPU/Triton), 'gpu' or 'tpu'.
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    [B, T, Hq, D] in q's dtype; differentiable in q, k, v (Pallas backward kernels).
  """
  _validate(q, k, v, kv_end)
  if block_q is not None or block_k is not None:
    if tuning is not None:
      raise ValueError("pass either block_q/block_k or tuning, not both")
    tiles = KernelTiles(block_q or 128, block_k or 128)
    tuning = Tuning(tiles, tiles, tiles)
  elif tuning is None:
    wide_f32 = jnp.dtype(q.dtype).itemsize >= 4 and q.shape[-1] > 64
    tuning = DEFAULT_TUNING_F32_WIDE if wide_f32 else DEFAULT_TUNING
  multiple = 1
  for kernel_name, tiles in zip(Tuning._fields, tuning):
    _check_block(f"{kernel_name}.block_q", tiles.block_q)
    _check_block(f"{kernel_name}.block_k", tiles.block_k)
    multiple = max(multiple, tiles.block_q, tiles.block_k)  # powers of two: max is the lcm
  length = q.shape[1]
  padded = pl.cdiv(length, multiple) * multiple
  cfg = _Config(scale=float(q.shape[-1]**-0.5 if scale is None else scale),
                backend=_resolve_backend(backend), interpret=bool(interpret), tuning=tuning)
  # Padded keys get kv_end 0 (seen by nobody); padded queries see nothing and get dO = 0.
  out = _tree_attention(_pad_length(q, padded), _pad_length(k, padded), _pad_length(v, padded),
                        _pad_length(kv_end.astype(jnp.int32), padded), cfg)
  return out[:, :length]
