"""Decode attention for one new token per row (Pallas on Triton; `interpret=True` on CPU):
RoPE, cache write and split-S attention over the filled slots, in two kernels.

`decode_attention_reference` is the plain-JAX definition `decode_attention` is tested
against. Overview of the decode kernels: `kat_jax.kernels.decode`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kat_jax.kernels.reference import cached_attention
from kat_jax.kernels.reference import apply_rope


def _compiler_params(num_warps: int, interpret: bool):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def decode_attention_reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                               positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                               valid: jax.Array, end: jax.Array, *, num_q_heads: int
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain JAX for `decode_attention` (the XLA decode path's math at one token per row)."""
  batch, _, num_kv_heads, head_dim = k_cache.shape
  hq, hkv = num_q_heads, num_kv_heads
  q, k, v = jnp.split(qkv, [hq * head_dim, (hq + hkv) * head_dim], axis=-1)
  cos, sin = cos[positions][:, None, None, :], sin[positions][:, None, None, :]
  q = apply_rope(q.reshape(batch, 1, hq, head_dim), cos, sin)
  k = apply_rope(k.reshape(batch, 1, hkv, head_dim), cos, sin)
  v = v.reshape(batch, 1, hkv, head_dim)
  k_cache = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, end, 0, 0))
  v_cache = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, end, 0, 0))
  visible = valid.astype(bool) & (jnp.arange(k_cache.shape[1]) <= end)[None, :]
  out = cached_attention(q, k_cache, v_cache, visible[:, None, :])
  return out.reshape(batch, hq * head_dim).astype(qkv.dtype), k_cache, v_cache


def _rope_of(qkv_ref, cos_ref, sin_ref, pos_ref, b, head_dim: int):
  """Reads the RoPE tables' row at row b's position; returns offset -> the rotated halves
  (float32) of the head vector qkv[b, offset:offset+D], rounded to qkv's dtype as
  `apply_rope`'s output is."""
  f32, dt = jnp.float32, qkv_ref.dtype
  half = head_dim // 2
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  pos = pos_ref[b]
  cos1, cos2 = cos_ref[pos, lo].astype(f32), cos_ref[pos, hi].astype(f32)
  sin1, sin2 = sin_ref[pos, lo].astype(f32), sin_ref[pos, hi].astype(f32)

  def rotated(offset):
    x1 = qkv_ref[b, pl.ds(offset, half)].astype(f32)
    x2 = qkv_ref[b, pl.ds(offset + half, half)].astype(f32)
    return ((x1 * cos1 - x2 * sin1).astype(dt).astype(f32),
            (x2 * cos2 + x1 * sin2).astype(dt).astype(f32))

  return rotated


def _masked_scores(q: tuple, k: tuple, visible: jax.Array, scale: float) -> jax.Array:
  """[n] scaled scores of the rotated query halves q = (q1, q2) [D/2] against key halves
  k = (k1, k2) [n, D/2], -1e30 where not visible."""
  s = (jnp.sum(q[0][None, :] * k[0], axis=1) + jnp.sum(q[1][None, :] * k[1], axis=1)) * scale
  return jnp.where(visible, s, jnp.float32(-1e30))


def _new_token_score(q: tuple, k_new: tuple, cache_dtype, scale: float) -> jax.Array:
  """Scaled score of the rotated query halves q against the new token's rotated key halves,
  the key rounded to the cache's dtype as the cached slots are."""
  k_new = [x.astype(cache_dtype).astype(jnp.float32) for x in k_new]
  return (jnp.sum(q[0] * k_new[0]) + jnp.sum(q[1] * k_new[1])) * scale


def _store_new_token(k_out_ref, v_out_ref, end, k_new: tuple, v_new: jax.Array) -> None:
  """Writes the new token's rotated key halves and its value [D] into cache slot `end`."""
  half = k_new[0].shape[0]
  k_out_ref[end, pl.ds(0, half)] = k_new[0].astype(k_out_ref.dtype)
  k_out_ref[end, pl.ds(half, half)] = k_new[1].astype(k_out_ref.dtype)
  v_out_ref[end, :] = v_new.astype(v_out_ref.dtype)


def _attention_split_kernel(end_ref, qkv_ref, cos_ref, sin_ref, pos_ref, valid_ref, k_ref,
                            v_ref, acc_ref, stats_ref, k_out_ref, v_out_ref, *, groups,
                            num_q_heads, num_kv_heads, head_dim, block_s):
  """One program per (row, query head, slot block): softmax statistics of that block.

  Writes acc [D] = sum_j p_j v_j and stats [2] = (m, l) with p_j = exp(s_j - m), l = sum p_j,
  over the block's cached slots j < end; block 0 also takes the new token's key (slot `end`,
  not read back from the cache), and the group's first head of block 0 writes the new k/v.
  Blocks past `end` write nothing (`_attention_combine_kernel` reads only blocks < end).
  """
  f32 = jnp.float32
  b, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = head // groups
  half = head_dim // 2
  end = end_ref[0]
  start = split * block_s

  @pl.when((split == 0) | (start < end))
  def _block():
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    rows = pl.ds(start, block_s)
    # Issue the block's cache loads first: they are the long-latency part of the program.
    in_range = start + jnp.arange(block_s) < end
    k1 = plgpu.load(k_ref.at[rows, lo], mask=in_range[:, None], other=0).astype(f32)
    k2 = plgpu.load(k_ref.at[rows, hi], mask=in_range[:, None], other=0).astype(f32)
    v = plgpu.load(v_ref.at[rows, :], mask=in_range[:, None], other=0).astype(f32)
    visible = in_range & (plgpu.load(valid_ref.at[b, rows], mask=in_range, other=0) != 0)
    rotated = _rope_of(qkv_ref, cos_ref, sin_ref, pos_ref, b, head_dim)
    scale = head_dim**-0.5
    q1, q2 = rotated(head * head_dim)
    s = _masked_scores((q1, q2), (k1, k2), visible, scale)
    m = jnp.max(s)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    l = jnp.sum(p)
    acc = jnp.sum(p[:, None] * v, axis=0)

    @pl.when(split == 0)
    def _with_new_token():
      k_new = rotated((num_q_heads + h) * head_dim)
      v_new = qkv_ref[b, pl.ds((num_q_heads + num_kv_heads + h) * head_dim, head_dim)]

      pl.when(head % groups == 0)(
          lambda: _store_new_token(k_out_ref, v_out_ref, end, k_new, v_new))

      v_new = v_new.astype(v_out_ref.dtype).astype(f32)
      new_visible = valid_ref[b, end] != 0
      s_new = _new_token_score((q1, q2), k_new, k_out_ref.dtype, scale)
      m_all = jnp.where(new_visible, jnp.maximum(m, s_new), m)
      alpha = jnp.exp(m - m_all)
      p_new = jnp.where(new_visible, jnp.exp(s_new - m_all), 0.0)
      acc_ref[...] = acc * alpha + p_new * v_new
      stats_ref[...] = jnp.where(jnp.arange(2) == 0, m_all, l * alpha + p_new)

    @pl.when(split > 0)
    def _cached_only():
      acc_ref[...] = acc
      stats_ref[...] = jnp.where(jnp.arange(2) == 0, m, l)


def _attention_combine_kernel(end_ref, acc_ref, stats_ref, out_ref, *, block_s, chunk,
                              head_dim):
  """One program per (row, query head): merges the blocks' (m, l, acc) into the output."""
  f32 = jnp.float32
  b, head = pl.program_id(0), pl.program_id(1)
  used = jnp.maximum((end_ref[0] + block_s - 1) // block_s, 1)  # blocks that wrote stats

  def merge(i, carry):  # blocks [i*chunk, (i+1)*chunk), only those < used
    m, l, acc = carry
    splits = pl.ds(i * chunk, chunk)
    live = i * chunk + jnp.arange(chunk) < used
    stats = plgpu.load(stats_ref.at[b, splits, head, :], mask=live[:, None], other=0)
    first = jnp.arange(2)[None, :] == 0
    m_s = jnp.where(live, jnp.sum(jnp.where(first, stats, 0.0), axis=1), -1e30)
    l_s = jnp.sum(jnp.where(first, 0.0, stats), axis=1)
    acc_s = plgpu.load(acc_ref.at[b, splits, head, :], mask=live[:, None], other=0)
    m_new = jnp.maximum(m, jnp.max(m_s))
    alpha, w = jnp.exp(m - m_new), jnp.exp(m_s - m_new)
    return m_new, l * alpha + jnp.sum(w * l_s), acc * alpha + jnp.sum(w[:, None] * acc_s, 0)

  init = (jnp.float32(-1e30), jnp.zeros((), f32), jnp.zeros((head_dim,), f32))
  _, l, acc = lax.fori_loop(0, (used + chunk - 1) // chunk, merge, init)
  out_ref[b, pl.ds(head * head_dim, head_dim)] = (acc / jnp.maximum(l, 1e-30)).astype(
      out_ref.dtype)


def decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array, end: jax.Array, *,
                     num_q_heads: int, block_s: int | None = None,
                     num_warps: int | None = None, interpret: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One new token per row: RoPE, cache write at slot `end`, attention over the cache.

  Two kernels (split-S, as flash decoding does): one program per (row, query head, block of
  `block_s` slots) computes the block's softmax statistics, so a short cache still spreads
  over many SMs; a second kernel merges the blocks per (row, query head).

  Args:
    qkv: [B, (Hq + 2 Hkv) D] the q/k/v projections (bias added, RoPE not yet applied).
    cos, sin: [P, D] RoPE tables by position (`kat_jax.sampling.forward.rope_tables`).
    positions: [B] int32, each row's position (its row of the tables, < P).
    k_cache, v_cache: [B, S, Hkv, D]; slot `end` receives the rotated key and the value.
    valid: [B, S] which slots hold real tokens, slot `end` included (bool or int).
    end: int32 scalar, the slot of the new token.
    block_s: cache slots per program (a power of two); by default S/16 within [16, 128],
      the fastest on an H200 at 256 and 2048 slots (benchmarks/decode_kernels.py).
    num_warps: Triton warps per program; by default 2 up to 32 slots per block, else 4.

  Returns:
    (out [B, Hq D] in qkv's dtype, k_cache, v_cache). Row b attends to slots j <= end with
    valid[b, j]; a row that sees nothing gets zeros (the XLA path would average; nothing
    reads such rows). The caches are updated in place when the caller donates them.
  """
  batch, cache_len, num_kv_heads, head_dim = k_cache.shape
  if num_q_heads % num_kv_heads or head_dim & (head_dim - 1):
    raise ValueError(f"need Hq % Hkv == 0 and a power-of-two head dim; got Hq={num_q_heads}, "
                     f"Hkv={num_kv_heads}, D={head_dim}")
  if qkv.shape != (batch, (num_q_heads + 2 * num_kv_heads) * head_dim):
    raise ValueError(f"qkv {qkv.shape} does not match the cache {k_cache.shape} and "
                     f"{num_q_heads} query heads")
  if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != head_dim:
    raise ValueError(f"cos {cos.shape} and sin {sin.shape} must be [P, D={head_dim}] tables")
  if positions.shape != (batch,):
    raise ValueError(f"positions {positions.shape} must be [B={batch}]")
  if block_s is None:
    padded = 1 << (cache_len - 1).bit_length()  # the cache length up to a power of two
    block_s = min(128, max(16, padded // 16))
  if num_warps is None:
    num_warps = 2 if block_s <= 32 else 4
  if block_s & (block_s - 1):
    raise ValueError(f"block_s must be a power of two, got {block_s}")
  end = jnp.reshape(jnp.asarray(end, jnp.int32), (1,))
  positions = positions.astype(jnp.int32)
  valid = valid.astype(jnp.int32)
  groups = num_q_heads // num_kv_heads
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  cache_block = pl.BlockSpec((None, cache_len, None, head_dim),
                             lambda b, head, _: (b, 0, head // groups, 0))
  splits = -(-cache_len // block_s)
  partial_shape = (batch, splits, num_q_heads)
  kernel = functools.partial(
      _attention_split_kernel, groups=groups, num_q_heads=num_q_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim, block_s=block_s)
  acc, stats, k_cache, v_cache = pl.pallas_call(
      kernel, grid=(batch, num_q_heads, splits),
      in_specs=[whole((1,)), whole(qkv.shape), whole(cos.shape), whole(sin.shape),
                whole(positions.shape), whole(valid.shape), cache_block, cache_block],
      out_specs=[pl.BlockSpec((None, None, None, head_dim), lambda b, h, s: (b, s, h, 0)),
                 pl.BlockSpec((None, None, None, 2), lambda b, h, s: (b, s, h, 0)),
                 cache_block, cache_block],
      out_shape=[jax.ShapeDtypeStruct(partial_shape + (head_dim,), jnp.float32),
                 jax.ShapeDtypeStruct(partial_shape + (2,), jnp.float32),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
      input_output_aliases={6: 2, 7: 3},
      compiler_params=_compiler_params(num_warps, interpret), interpret=interpret,
      name="decode_attention_blocks")(end, qkv, cos, sin, positions, valid, k_cache, v_cache)
  chunk = min(16, 1 << (splits - 1).bit_length())
  combine = functools.partial(_attention_combine_kernel, block_s=block_s, chunk=chunk,
                              head_dim=head_dim)
  out = pl.pallas_call(
      combine, grid=(batch, num_q_heads),
      in_specs=[whole((1,)), whole(acc.shape), whole(stats.shape)],
      out_specs=whole((batch, num_q_heads * head_dim)),
      out_shape=jax.ShapeDtypeStruct((batch, num_q_heads * head_dim), qkv.dtype),
      compiler_params=_compiler_params(4, interpret), interpret=interpret,
      name="decode_attention_combine")(end, acc, stats)
  return out, k_cache, v_cache
