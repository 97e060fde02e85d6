"""Paged decode attention on Mosaic GPU (Pallas, Hopper): split-K flash decoding.

Decode attention reads every live KV byte once and does little arithmetic per byte, so the
kernel is built for memory bandwidth:
- one program per (row, kv head, split of `split_tokens` keys of the table); the Hq/Hkv
  query heads of the kv head share each K/V tile (GQA), padded to the 64 rows of one
  warpgroup MMA; splits past a row's length exit at once;
- a block of `block_tokens` keys is gathered page by page with TMA copies into shared memory,
  `stages` blocks in flight ahead of the one being computed;
- QK^T and PV run on the tensor cores (wgmma) with an online softmax in registers;
- each program writes its split's normalised output and log-sum-exp; `merge_splits` (XLA)
  combines the splits, so short batches still spread over every SM.
Pages past a row's last page are not read: a block's dead page slots re-read the row's last
live page (an L2 hit) and are masked, like keys past the length in a partly filled page.
Inputs are bf16 or f16 (the tensor cores' operands); f32 goes to the XLA path.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kat_jax.kernels import mgpu_support

_ROWS = 64  # one warpgroup MMA's rows: the query heads of a kv head, zero-padded
_LOG2E = math.log2(math.e)
DTYPES = (jnp.bfloat16, jnp.float16)


def supports(dtype: Any, groups: int, head_dim: int, page_size: int) -> bool:
  """Whether the kernel (at its default tiling) takes inputs of `dtype` with `groups` query
  heads per kv head, `head_dim` and `page_size`."""
  block = max(64, page_size)
  return (jnp.dtype(dtype) in [jnp.dtype(d) for d in DTYPES] and -(-groups // 8) * 8 <= _ROWS
          and head_dim % 64 == 0 and page_size % 8 == 0 and block % 64 == 0
          and block % page_size == 0)


def default_tiling(batch: int, num_kv_heads: int, max_tokens: int, page_size: int,
                   block_tokens: int | None = None) -> tuple[int, int]:
  """(block_tokens, split_tokens): blocks of 64 keys (or one page, if larger), so that with 2
  stages a program's shared memory (80 KiB at D=128) leaves room for two per SM; splits
  of whole blocks, as long as gives at least ~4 programs per SM (132 SMs) at the longest
  rows, between 2 and 16 blocks. A given `block_tokens` is kept."""
  block = block_tokens or max(64, page_size)
  programs_per_split = batch * num_kv_heads
  blocks = -(-max_tokens // block)
  want_splits = -(-4 * 132 // programs_per_split)
  per_split = min(16, max(2, -(-blocks // want_splits)))
  return block, block * per_split


def merge_splits(out: jax.Array, lse: jax.Array, live: jax.Array) -> jax.Array:
  """Combines split outputs: out [B, Hkv, S, G, D] f32 (each split normalised), lse
  [B, Hkv, S, G] base-2 log-sum-exp, live [B, S] bool (splits that hold keys; the others'
  values are garbage) -> [B, Hkv, G, D] f32, zeros for a row with no live split."""
  lse = jnp.where(live[:, None, :, None], lse, -jnp.inf)
  top = jnp.max(lse, axis=2, keepdims=True)
  weight = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # dead splits: 0
  out = jnp.where(live[:, None, :, None, None], out, 0.0)
  total = jnp.sum(weight, axis=2)
  merged = jnp.sum(weight[..., None] * out, axis=2)
  return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _mma(a, b, n: int, *, transpose_b: bool, interpret: bool) -> jax.Array:
  """a @ b (or a @ b.T) as float32 [64, n] on the tensor cores: a [64, K] in shared memory or
  registers, b [K, n] (or [n, K]) in shared memory. Returning the result waits for the MMA,
  so b's buffer is free afterwards. The interpreter, which has no wgmma of these operands,
  takes a plain dot."""
  plgpu = mgpu_support.plgpu()
  if interpret:
    a = a if isinstance(a, jax.Array) else a[...]
    b = b[...].T if transpose_b else b[...]
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b

  def product(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(product, plgpu.ACC((_ROWS, n), jnp.float32))


def _attend(q_ref, k_ref, v_ref, table_ref, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, *,
            b, h, first_page, last_page, live_keys, num_blocks, page_size: int,
            block_tokens: int, stages: int, num_pages: int, interpret: bool):
  """One split: copies row b's query heads of kv head h into q_smem [64, D] (`_load_query`)
  and runs the online softmax over `num_blocks` blocks of the row's keys from page
  `first_page` on (`live_keys` of them live; pages past `last_page` re-read it), `stages`
  blocks in flight. Returns (acc [64, D], m [64], l [64]) f32: unnormalised output, max, sum
  (base 2); with num_blocks = 0 nothing is copied and the initial values come back."""
  plgpu = mgpu_support.plgpu()
  head_dim = q_smem.shape[-1]
  dtype = q_smem.dtype
  scale = head_dim**-0.5 * _LOG2E  # scores in base 2: exp2 is one instruction
  layout = (lambda x, _: x) if interpret else plgpu.layout_cast
  cols = layout(lax.broadcasted_iota(jnp.int32, (_ROWS, block_tokens), 1),
                plgpu.Layout.WGMMA)
  issue = functools.partial(_issue, k_smem, v_smem, k_bar, v_bar, k_ref, v_ref, table_ref,
                            b=b, h=h, first_page=first_page, last_page=last_page,
                            page_size=page_size, block_tokens=block_tokens,
                            num_pages=num_pages)

  @pl.when(num_blocks > 0)
  def _prologue():
    _load_query(q_smem, q_bar, q_ref, b, h, interpret=interpret)
    for stage in range(stages):
      pl.when(stage < num_blocks)(functools.partial(issue, stage, stage))
    plgpu.barrier_wait(q_bar)  # after the K/V copies are on their way

  def step(block, carry):
    acc, m, l = carry
    slot = lax.rem(block, stages)
    plgpu.barrier_wait(k_bar.at[slot])
    s = _mma(q_smem, k_smem.at[slot], block_tokens, transpose_b=True, interpret=interpret)
    live = cols < live_keys - block * block_tokens
    s = jnp.where(live, s * scale, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))  # finite: every block has a live key
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    plgpu.barrier_wait(v_bar.at[slot])
    pv = _mma(p.astype(dtype), v_smem.at[slot], head_dim, transpose_b=False,
              interpret=interpret)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
    pl.when(block + stages < num_blocks)(lambda: issue(block + stages, slot))
    return acc, m_new, l

  acc = layout(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
  m = layout(jnp.full((_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  l = layout(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
  return lax.fori_loop(0, num_blocks, step, (acc, m, l))


def _issue(k_smem, v_smem, k_bar, v_bar, k_ref, v_ref, table_ref, block, slot, *, b, h,
           first_page, last_page, page_size: int, block_tokens: int, num_pages: int) -> None:
  """Gathers block `block` (from page `first_page` of row b) of K and V into `slot`: one TMA
  copy per page; pages past `last_page` re-read it (masked later)."""
  plgpu = mgpu_support.plgpu()
  for i in range(block_tokens // page_size):
    index = jnp.minimum(first_page + block * (block_tokens // page_size) + i, last_page)
    page = jnp.clip(table_ref[b, index], 0, num_pages - 1)
    rows = pl.ds(i * page_size, page_size)
    plgpu.copy_gmem_to_smem(k_ref.at[h, page], k_smem.at[slot, rows], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[h, page], v_smem.at[slot, rows], v_bar.at[slot])


def _scratch(head_dim: int, block_tokens: int, stages: int, page_size: int, dtype):
  """Shared memory of one program: query, K and V stage rings, their barriers."""
  plgpu = mgpu_support.plgpu()
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  kv_buffer = plgpu.SMEM((stages, block_tokens, head_dim), dtype, transforms=tiled)
  arrivals = dict(num_arrivals=block_tokens // page_size, num_barriers=stages)  # a copy per page
  return (plgpu.SMEM((_ROWS, head_dim), dtype, transforms=tiled), kv_buffer, kv_buffer,
          plgpu.Barrier(), plgpu.Barrier(**arrivals), plgpu.Barrier(**arrivals))


def _load_query(q_smem, q_bar, q_ref, b, h, *, interpret: bool) -> None:
  """Zeroes q_smem [64, D] and starts copying row b's query heads of kv head h into its first
  rows; wait on q_bar before reading them."""
  plgpu = mgpu_support.plgpu()
  groups8, head_dim = q_ref.shape[2], q_ref.shape[3]
  layout = (lambda x, _: x) if interpret else plgpu.layout_cast
  q_smem[...] = layout(jnp.zeros((_ROWS, head_dim), q_smem.dtype), plgpu.Layout.WGMMA)
  plgpu.commit_smem()
  plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem.at[pl.ds(0, groups8)], q_bar)


def _store(o_smem, lse_smem, o_ref, lse_ref, acc, m, l, b, h, split) -> None:
  """Writes one split's normalised output and base-2 log-sum-exp to o_ref/lse_ref[b, h,
  split] and waits until the shared-memory tiles are free again."""
  plgpu = mgpu_support.plgpu()
  groups8 = o_ref.shape[-2]
  o_smem[...] = acc / lax.broadcast_in_dim(l, acc.shape, [0])
  lse_smem[...] = m + jnp.log2(l)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, groups8)], o_ref.at[b, h, split])
  plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, groups8)], lse_ref.at[b, h, split])
  plgpu.wait_smem_to_gmem(0)


def _kernel(q_ref, k_ref, v_ref, table_ref, len_ref, o_ref, lse_ref, *, page_size: int,
            block_tokens: int, split_tokens: int, stages: int, num_pages: int,
            interpret: bool):
  """Program (split, kv head, row): online softmax over the split's live blocks.

  q_ref [B, Hkv, G8, D] (zero-padded heads), k_ref/v_ref [Hkv, P, page_size, D], table_ref
  [B, max_pages], len_ref [B]; writes o_ref [B, Hkv, S, G8, D] f32 (normalised) and lse_ref
  [B, Hkv, S, G8] (base 2). A split without live keys writes nothing.
  Shared memory: the query and the K/V stage buffers, then (reusing their space) the f32
  output tile.
  """
  plgpu = mgpu_support.plgpu()
  split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("row")
  head_dim = q_ref.shape[-1]
  length = len_ref[b]
  start = split * split_tokens
  live_keys = jnp.minimum(length - start, split_tokens)
  num_blocks = lax.div(jnp.maximum(live_keys, 0) + block_tokens - 1, block_tokens)
  where = dict(b=b, h=h, first_page=split * (split_tokens // page_size),
               last_page=jnp.maximum(lax.div(length + page_size - 1, page_size) - 1, 0),
               page_size=page_size, block_tokens=block_tokens, num_pages=num_pages)

  attend = functools.partial(_attend, q_ref, k_ref, v_ref, table_ref, live_keys=live_keys,
                             num_blocks=num_blocks, stages=stages,
                             interpret=interpret, **where)
  acc, m, l = pl.run_scoped(attend, *_scratch(head_dim, block_tokens, stages, page_size,
                                              q_ref.dtype))

  def store(o_smem, lse_smem):
    pl.when(num_blocks > 0)(
        lambda: _store(o_smem, lse_smem, o_ref, lse_ref, acc, m, l, b, h, split))

  pl.run_scoped(store, plgpu.SMEM((_ROWS, head_dim), jnp.float32),
                plgpu.SMEM((_ROWS,), jnp.float32))


def paged_decode_attention_mgpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                page_table: jax.Array, lengths: jax.Array, *,
                                block_tokens: int | None = None,
                                split_tokens: int | None = None, stages: int = 2,
                                tiling_batch: int | None = None,
                                interpret: bool = False) -> jax.Array:
  """`paged_decode_attention_reference` on Mosaic GPU (bf16/f16 inputs, Hq/Hkv <= 64).

  q [B, Hq, D], k_pages/v_pages [Hkv, P, page_size, D], page_table [B, max_pages] int32,
  lengths [B] int32 -> [B, Hq, D] in q's dtype.

  Args:
    block_tokens: keys per MMA block, a multiple of 64 and of page_size (default
      `default_tiling`).
    split_tokens: keys per program, a multiple of block_tokens (default `default_tiling`).
    stages: blocks copied ahead of the one being computed (shared-memory buffers).
    tiling_batch: the batch `default_tiling` picks the split for (default B): a caller that
      runs some rows of a wider batch passes the wider batch, so each row's splits, and so
      its rounding, are those of the wider call.
    interpret: run with Mosaic GPU's CPU interpreter (tests).
  """
  plgpu = mgpu_support.plgpu()
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape
  groups = num_q_heads // num_kv_heads
  groups8 = -(-groups // 8) * 8
  max_pages = page_table.shape[1]
  max_tokens = max_pages * page_size
  block_tokens, default_split = default_tiling(tiling_batch or batch, num_kv_heads, max_tokens,
                                               page_size, block_tokens)
  split_tokens = split_tokens or default_split
  if q.dtype not in DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
    raise ValueError(f"mosaic_gpu takes q, k_pages, v_pages all bf16 or all f16, got "
                     f"{q.dtype}, {k_pages.dtype}, {v_pages.dtype} (use backend='xla')")
  if groups8 > _ROWS or head_dim % 64:
    raise ValueError(f"mosaic_gpu needs Hq/Hkv <= {_ROWS} and D a multiple of 64, got "
                     f"Hq/Hkv={groups}, D={head_dim}")
  if page_size % 8 or block_tokens % 64 or block_tokens % page_size or split_tokens % block_tokens:
    raise ValueError(f"mosaic_gpu needs page_size a multiple of 8 (got {page_size}), "
                     f"block_tokens a multiple of 64 and of it (got {block_tokens}), "
                     f"split_tokens a multiple of block_tokens (got {split_tokens})")
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_tokens)  # as the reference reads them
  q8 = jnp.pad(q.reshape(batch, num_kv_heads, groups, head_dim),
               ((0, 0), (0, 0), (0, groups8 - groups), (0, 0)))
  num_splits = -(-max_tokens // split_tokens)
  kernel = functools.partial(_kernel, page_size=page_size, block_tokens=block_tokens,
                             split_tokens=split_tokens, stages=stages, num_pages=num_pages,
                             interpret=interpret)
  out, lse = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, groups8, head_dim),
                                     jnp.float32),
                jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, groups8), jnp.float32)),
      grid=(num_splits, num_kv_heads, batch),
      grid_names=("split", "head", "row"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=mgpu_support.interpret_params() if interpret else False,
      kernel_name="paged_decode_attention_mgpu",
  )(q8, k_pages, v_pages, page_table.astype(jnp.int32), lengths)
  live = jnp.arange(num_splits)[None, :] * split_tokens < lengths[:, None]
  merged = merge_splits(out, lse, live)[:, :, :groups]
  return merged.reshape(batch, num_q_heads, head_dim).astype(q.dtype)
