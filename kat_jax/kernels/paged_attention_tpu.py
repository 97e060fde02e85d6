"""Paged decode attention as a TPU-style Pallas kernel (Mosaic TPU; `interpret=True` on CPU).

The page table and the lengths are scalar-prefetched, so the BlockSpecs' index maps pick each
grid step's pages: the grid is (row, kv head, block of `pages_per_block` pages) and every page
of a block is its own BlockSpec'd input, copied HBM -> VMEM by the Pallas pipeline. The block
axis runs in order and keeps an online softmax in VMEM scratch (flash attention). A block past
the row's last page maps to the row's last live page, which the pipeline does not copy again
(the block index is unchanged) and the kernel skips, so dead table entries are never read.

JAX's own `jax.experimental.pallas.ops.tpu.paged_attention` does not fit this interface: it
copies every table entry of a block (in interpret mode an entry past a row's pages that is out
of range fails the bounds check), rounds K/V to bf16 inside, and leaves the 1/sqrt(D) scale to
the caller (jax 0.10.2; with q pre-scaled and valid entries it matched the reference to 3e-3).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_LANES = 128  # softmax statistics are kept lane-replicated, the TPU's native (8, 128) tile


def _live_page(lengths_ref, table_ref, b, j, *, page_size: int, num_pages: int):
  """Pool index of row b's j-th page, with j clamped to the row's last live page (page 0's
  entry for an empty row) and the index clamped into the pool, so every copy is in range."""
  # lax.div: lengths are >= 0, and floor division's sign handling does not lower on TPU.
  last = jnp.maximum(jax.lax.div(lengths_ref[b] + page_size - 1, page_size) - 1, 0)
  return jnp.clip(table_ref[b, jnp.minimum(j, last)], 0, num_pages - 1)


def _kernel(lengths_ref, table_ref, q_ref, *refs, pages_per_block: int, page_size: int):
  """One grid step: the softmax update of row b, kv head h over block j's pages.

  refs: K pages [page_size, D] x pages_per_block, V pages likewise, out [G, D], then the
  scratch m, l [G, 128] and acc [G, D] (float32).
  """
  k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
  o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
  b, j = pl.program_id(0), pl.program_id(2)
  block = pages_per_block * page_size
  length = lengths_ref[b]
  start = j * block

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(start < length)
  def _update():
    q = q_ref[...]
    k = jnp.concatenate([r[...] for r in k_refs], axis=0)  # [T, D]
    v = jnp.concatenate([r[...] for r in v_refs], axis=0)
    live_col = start + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1) < length  # [1, T]
    live_row = start + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < length  # [T, 1]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * q.shape[-1]**-0.5
    s = jnp.where(live_col, s, -jnp.inf)  # [G, T]
    m_prev = m_ref[:, :1]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # finite: a key is live
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    v = jnp.where(live_row, v, 0)  # slots past the length may hold anything
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    l_new = l_ref[:, :1] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = acc_ref[...] * alpha + pv
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l_new, l_ref.shape)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_ref[:, :1]
    o_ref[...] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(
        o_ref.dtype)


def paged_decode_attention_tpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                               page_table: jax.Array, lengths: jax.Array, *,
                               pages_per_block: int | None = None,
                               interpret: bool = False) -> jax.Array:
  """`paged_decode_attention_reference` as a TPU-style Pallas kernel.

  q [B, Hq, D], k_pages/v_pages [Hkv, P, page_size, D], page_table [B, max_pages] int32,
  lengths [B] int32 -> [B, Hq, D] in q's dtype.

  Args:
    pages_per_block: pages per grid step (default: as many as make up to 128 keys, at most
      max_pages).
    interpret: run with the Pallas interpreter (CPU tests).
  """
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape
  groups = num_q_heads // num_kv_heads
  max_pages = page_table.shape[1]
  if pages_per_block is None:
    pages_per_block = max(1, min(max_pages, 128 // page_size))
  num_blocks = -(-max_pages // pages_per_block)
  page_of = functools.partial(_live_page, page_size=page_size, num_pages=num_pages)

  def page_spec(i):
    return pl.BlockSpec(
        (None, None, page_size, head_dim),
        lambda b, h, j, lengths, table: (h, page_of(lengths, table, b,
                                                    j * pages_per_block + i), 0, 0))

  page_specs = [page_spec(i) for i in range(pages_per_block)]
  head_spec = pl.BlockSpec((None, None, groups, head_dim), lambda b, h, j, *_: (b, h, 0, 0))
  kernel = functools.partial(_kernel, pages_per_block=pages_per_block, page_size=page_size)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(batch, num_kv_heads, num_blocks),
      in_specs=[head_spec] + page_specs + page_specs,
      out_specs=head_spec,
      scratch_shapes=[pltpu.VMEM((groups, _LANES), jnp.float32),
                      pltpu.VMEM((groups, _LANES), jnp.float32),
                      pltpu.VMEM((groups, head_dim), jnp.float32)])
  out = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, groups, head_dim), q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret, name="paged_decode_attention_tpu",
  )(jnp.clip(lengths.astype(jnp.int32), 0, max_pages * page_size),  # as the reference
    page_table.astype(jnp.int32),
    q.reshape(batch, num_kv_heads, groups, head_dim),
    *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))
  return out.reshape(batch, num_q_heads, head_dim)
