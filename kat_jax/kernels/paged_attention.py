"""Decode attention over a paged KV cache: one new query token per row.

The cache is a pool of fixed-size pages shared by all rows: `k_pages[h, p]` holds `page_size`
consecutive keys of kv head h. Row b's keys 0..lengths[b]-1 live in pages
page_table[b, 0], page_table[b, 1], ... (key t in page page_table[b, t // page_size], slot
t % page_size). Table entries past a row's last page are never read, so they may hold any
value; the same page may appear in several rows' tables (a shared prompt prefix).

Backends (all compute the same function):
  "xla"          `paged_decode_attention_reference`: gather the rows' pages, mask, softmax.
  "mosaic_gpu"   Pallas on Mosaic GPU (Hopper), a program per (split, kv head, row).
  "pallas_tpu"   Pallas with TPU-style BlockSpecs and the page table as scalar prefetch
                 (lowers with Mosaic TPU; `interpret=True` runs it on CPU).
  "auto"         `default_backend`: "pallas_tpu" on TPU, "mosaic_gpu" on Hopper, else "xla".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kat_jax.kernels import mgpu_support

BACKENDS = ("auto", "xla", "mosaic_gpu", "pallas_tpu")


def _check_shapes(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                  lengths: jax.Array) -> None:
  """ValueError naming the argument whose shape does not fit the others."""
  if q.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
  batch, num_q_heads, head_dim = q.shape
  if k_pages.ndim != 4 or k_pages.shape[-1] != head_dim:
    raise ValueError(f"k_pages must be [Hkv, P, page_size, D={head_dim}], got {k_pages.shape}")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages {v_pages.shape} must match k_pages {k_pages.shape}")
  if num_q_heads % k_pages.shape[0]:
    raise ValueError(f"query heads Hq={num_q_heads} must be a multiple of kv heads "
                     f"Hkv={k_pages.shape[0]}")
  if page_table.ndim != 2 or page_table.shape[0] != batch:
    raise ValueError(f"page_table must be [B={batch}, max_pages], got {page_table.shape}")
  if lengths.shape != (batch,):
    raise ValueError(f"lengths must be [B={batch}], got {lengths.shape}")


def paged_decode_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                                     page_table: jax.Array, lengths: jax.Array) -> jax.Array:
  """Plain JAX: gather each row's pages into a [B, S] cache, mask keys >= lengths, softmax.

  Args:
    q: [B, Hq, D] queries (bf16 or f32).
    k_pages, v_pages: [Hkv, P, page_size, D] the page pool; Hq is a multiple of Hkv.
    page_table: [B, max_pages] int32 page indices per row.
    lengths: [B] int32 valid keys per row (<= max_pages * page_size).

  Returns:
    [B, Hq, D] in q's dtype: softmax(q k^T / sqrt(D)) v over each row's valid keys, scores
    and sums in float32; a row of length 0 gets zeros. Keys and values past a row's length
    (also NaN/inf ones in a partly filled page) do not affect the result.
  """
  _check_shapes(q, k_pages, v_pages, page_table, lengths)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, num_pages, page_size, _ = k_pages.shape
  groups = num_q_heads // num_kv_heads
  max_pages = page_table.shape[1]
  seq = max_pages * page_size
  live = jnp.arange(seq)[None, :] < lengths[:, None]  # [B, S]
  live_pages = jnp.arange(max_pages)[None, :] * page_size < lengths[:, None]  # [B, max_pages]
  # Dead table entries may be any value: point them at page 0 so the gather stays in range.
  table = jnp.where(live_pages, jnp.clip(page_table, 0, num_pages - 1), 0)

  def gather(pages):  # [Hkv, P, page_size, D] -> [B, Hkv, S, D], dead keys zeroed
    rows = pages[:, table].reshape(num_kv_heads, batch, seq, head_dim)
    rows = jnp.where(live[None, :, :, None], rows, 0)
    return jnp.swapaxes(rows, 0, 1)

  k, v = gather(k_pages), gather(v_pages)
  qg = q.reshape(batch, num_kv_heads, groups, head_dim)
  scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k, preferred_element_type=jnp.float32)
  scores = jnp.where(live[:, None, None, :], scores * head_dim**-0.5, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bhgs,bhsd->bhgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def default_backend(dtype: Any = jnp.bfloat16, groups: int = 1, head_dim: int = 128,
                    page_size: int = 16) -> str:
  """The backend "auto" picks on the default device for inputs of `dtype` with `groups` query
  heads per kv head, `head_dim` and `page_size`.

  "pallas_tpu" on TPU; "mosaic_gpu" on a Hopper GPU (compute capability 9.x) for the inputs
  it takes (bf16/f16, `paged_attention_mgpu.supports`); else "xla". On an H100 the Mosaic GPU
  kernel made the engine's full-occupancy decode step 4.2x faster than "xla"
  (benchmarks/results/rollout_qwen2.5-1.5b_*_h100.json).
  """
  if jax.devices()[0].platform == "tpu":
    return "pallas_tpu"
  if mgpu_support.is_hopper():
    from kat_jax.kernels.paged_attention_mgpu import supports  # pylint: disable=g-import-not-at-top
    if supports(dtype, groups, head_dim, page_size):
      return "mosaic_gpu"
  return "xla"


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, lengths: jax.Array, *,
                           backend: str = "auto", tiling_batch: int | None = None) -> jax.Array:
  """Attention of one query token per row over its pages of the KV cache.

  Shapes and semantics as `paged_decode_attention_reference`:
  q [B, Hq, D], k_pages/v_pages [Hkv, P, page_size, D], page_table [B, max_pages] int32,
  lengths [B] int32 -> [B, Hq, D] in q's dtype; scale 1/sqrt(D), float32 softmax; rows of
  length 0 give zeros; table entries past a row's pages are not read.

  Args:
    backend: one of BACKENDS ("auto" picks by platform, see `default_backend`).
    tiling_batch: the batch `mosaic_gpu` picks its split of the keys for (default B): rows
      taken out of a wider batch and passed its width get the wider call's results exactly.
      The other backends have no batch-dependent tiling.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  _check_shapes(q, k_pages, v_pages, page_table, lengths)
  if backend == "auto":
    backend = default_backend(q.dtype, q.shape[1] // k_pages.shape[0], q.shape[2],
                              k_pages.shape[2])
  if backend == "mosaic_gpu":
    from kat_jax.kernels.paged_attention_mgpu import paged_decode_attention_mgpu  # pylint: disable=g-import-not-at-top
    return paged_decode_attention_mgpu(q, k_pages, v_pages, page_table, lengths,
                                       tiling_batch=tiling_batch)
  if backend == "pallas_tpu":
    from kat_jax.kernels.paged_attention_tpu import paged_decode_attention_tpu  # pylint: disable=g-import-not-at-top
    return paged_decode_attention_tpu(q, k_pages, v_pages, page_table, lengths,
                                      interpret=jax.devices()[0].platform != "tpu")
  return paged_decode_attention_reference(q, k_pages, v_pages, page_table, lengths)
