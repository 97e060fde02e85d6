"""Fused kernels for decoding a few rows at a time (Pallas on Triton; `interpret=True` on CPU).

At batch 1 a decode step is a chain of matrix-vector products over the whole model's weights
with small element-wise ops between them. XLA runs it as ~20 kernels per layer, and it turns
the smaller products (q/k/v, o) into multiply + reduce pairs that write the product to memory;
on an H200 that made a Qwen2.5-1.5B step take 2.1 ms of kernel time for 0.75 ms of weight
reads (see docs/performance.md). These kernels do one layer in five launches:

  fused_matvec(x, w_qkv, norm_scale=..., bias=...)       RMSNorm -> q/k/v projection (+ bias)
  decode_attention(qkv, cos, sin, pos, k_cache, ...)      RoPE, cache write, attention
  fused_matvec(attn, w_o, residual=h)                     o projection + residual
  fused_matvec(h, w_gate_up, norm_scale=..., swiglu=True) RMSNorm -> gate/up -> SiLU(g)*u
  fused_matvec(act, w_down, residual=h)                   down projection + residual

Weights are output-major (`w [N, K]`, the HF layout), so each program reads whole contiguous
rows. Each `*_reference` beside a kernel is the plain-JAX definition it is tested against.
Rounding follows the XLA path (`kat_jax.sampling.forward`): products accumulate in float32 and
round to the compute dtype where the XLA path's einsums do.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kat_jax.kernels.reference import cached_attention
from kat_jax.kernels.reference import apply_rope, rms_norm

MAX_BATCH = 4  # rows per call; each row keeps its own accumulators in registers
_MAX_CHUNK = 256


def _column_chunks(size: int, limit: int = _MAX_CHUNK) -> list[tuple[pl.Slice, int]]:
  """K's columns as loads of one power-of-two width (Triton loads power-of-two blocks): the
  widest <= min(limit, size). Where it does not divide `size`, the last chunk ends at `size`
  and overlaps the one before; its first `skip` columns are masked (loaded as 0).

  Returns [(columns, skip)], skip 0 for every chunk but an overlapping last one.
  """
  chunk = 1 << (min(limit, size).bit_length() - 1)
  count = -(-size // chunk)
  last = size - chunk
  return [(pl.ds(min(c * chunk, last), chunk), c * chunk - min(c * chunk, last))
          for c in range(count)]


def _load_columns(ref, index: tuple, column_chunk: tuple[pl.Slice, int]) -> jax.Array:
  """ref[(*index, columns)], with the chunk's first `skip` columns masked to 0."""
  columns, skip = column_chunk
  if not skip:
    return ref[(*index, columns)]
  lead = sum(isinstance(i, pl.Slice) for i in index)  # the loaded block's other dims
  index = tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)  # plgpu.load's form
  keep = lax.broadcasted_iota(jnp.int32, (1,) * lead + (columns.size,), lead) >= skip
  return plgpu.load(ref.at[(*index, columns)], mask=keep, other=0)


def _compiler_params(num_warps: int, interpret: bool):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


# ----------------------------------------------------------------------------- matvec


def matvec_reference(x: jax.Array, w: jax.Array, *, norm_scale: jax.Array | None = None,
                     eps: float = 1e-6, bias: jax.Array | None = None,
                     residual: jax.Array | None = None, swiglu: bool = False) -> jax.Array:
  """Plain JAX: x [B,K], w [N,K] -> [B,N] (or [B,N/2] with swiglu), x's dtype."""
  if norm_scale is not None:
    x = rms_norm(x, norm_scale, eps)
  y = jnp.einsum("bk,nk->bn", x, w)
  if bias is not None:
    y = y + bias
  if swiglu:
    gate, up = jnp.split(y, 2, axis=-1)
    y = nn.silu(gate) * up
  if residual is not None:
    y = residual + y
  return y


def _normalized_rows(x_ref, scale_ref, *, batch, k_size, cols, eps) -> list[list[jax.Array]]:
  """x's rows as float32 column chunks, RMS-normalised as rms_norm does (round, scale, round)."""
  f32, dt = jnp.float32, x_ref.dtype
  rows = []
  for b in range(batch):
    xs = [_load_columns(x_ref, (b,), col).astype(f32) for col in cols]
    if scale_ref is not None:
      mean_sq = sum(jnp.sum(x * x) for x in xs) / k_size
      inv = lax.rsqrt(mean_sq + eps)
      xs = [((x * inv).astype(dt).astype(f32) * _load_columns(scale_ref, (), col)
             .astype(f32)).astype(dt).astype(f32) for x, col in zip(xs, cols)]
    rows.append(xs)
  return rows


def _load_block(w_parts, start, block_n: int, cols) -> list[list[jax.Array]]:
  """Weight rows [start, start + block_n) of each part (the product, or gate and up) as
  [block_n, chunk] column chunks (`_column_chunks`). w_parts: (ref, row offset of the part
  in ref) pairs."""
  return [[_load_columns(ref, (pl.ds(offset + start, block_n),), col) for col in cols]
          for ref, offset in w_parts]


def _finish_block(chunks, rows, start, block_n: int, out_ref, bias_ref, res_ref,
                  swiglu: bool) -> None:
  """out[:, start:start+block_n] from one block's weight chunks (see `_load_block`)."""
  f32, dt = jnp.float32, out_ref.dtype
  outputs = pl.ds(start, block_n)
  # acc[b] [bn, chunk] of partial products: plain FMAs in the loop, one reduction at the end.
  sums = []
  for part in chunks:
    accs = [None] * len(rows)
    for c, w in enumerate(part):
      w = w.astype(f32)
      for b, row in enumerate(rows):
        term = w * row[c][None, :]
        accs[b] = term if accs[b] is None else accs[b] + term
    sums.append([jnp.sum(acc, axis=1) for acc in accs])
  for b in range(len(rows)):
    y = sums[0][b].astype(dt)
    if bias_ref is not None:
      y = (y.astype(f32) + bias_ref[outputs].astype(f32)).astype(dt)
    if swiglu:
      gate, up = y.astype(f32), sums[1][b].astype(dt).astype(f32)
      silu = (gate / (1.0 + jnp.exp(-gate))).astype(dt).astype(f32)
      y = (silu * up).astype(dt)
    if res_ref is not None:
      y = (res_ref[b, outputs].astype(f32) + y.astype(f32)).astype(dt)
    out_ref[b, outputs] = y


def _matvec_kernel(*refs, batch, k_size, max_chunk, eps, has_norm, has_bias, has_residual,
                   swiglu, block_n, blocks, programs):
  """Without `programs`: one block of `block_n` outputs per program (refs are block views).

  With `programs`: a persistent grid; program p computes blocks p, p + programs, ... of
  whole-array refs and loads each next block's weights before reducing the current one.
  """
  refs = list(refs)
  x_ref = refs.pop(0)
  w_refs = [refs.pop(0) for _ in range(2 if swiglu and programs is None else 1)]
  scale_ref = refs.pop(0) if has_norm else None
  bias_ref = refs.pop(0) if has_bias else None
  res_ref = refs.pop(0) if has_residual else None
  (out_ref,) = refs
  cols = _column_chunks(k_size, max_chunk)
  rows = _normalized_rows(x_ref, scale_ref, batch=batch, k_size=k_size, cols=cols, eps=eps)
  finish = functools.partial(_finish_block, rows=rows, block_n=block_n, out_ref=out_ref,
                             bias_ref=bias_ref, res_ref=res_ref, swiglu=swiglu)
  if programs is None:
    finish(_load_block([(w, 0) for w in w_refs], 0, block_n, cols), start=0)
    return

  parts = [(w_refs[0], 0), (w_refs[0], blocks * block_n)] if swiglu else [(w_refs[0], 0)]
  p = pl.program_id(0)
  steps = -(-blocks // programs)  # the last step is partial when programs does not divide

  def load_step(t):  # in the last step, programs past the last block re-read it
    return _load_block(parts, jnp.minimum(p + t * programs, blocks - 1) * block_n, block_n,
                       cols)

  def step(t, chunks):  # every block of the steps before the last exists
    following = load_step(t + 1)
    finish(chunks, start=(p + t * programs) * block_n)
    return following

  last = lax.fori_loop(0, steps - 1, step, load_step(0))
  final = p + (steps - 1) * programs
  pl.when(final < blocks)(lambda: finish(last, start=final * block_n))


def fused_matvec(x: jax.Array, w: jax.Array, *, norm_scale: jax.Array | None = None,
                 eps: float = 1e-6, bias: jax.Array | None = None,
                 residual: jax.Array | None = None, swiglu: bool = False, block_n: int = 8,
                 num_warps: int = 4, programs: int | None = None, max_chunk: int = _MAX_CHUNK,
                 name: str | None = None,
                 interpret: bool = False) -> jax.Array:
  """`matvec_reference` as one kernel: optional RMSNorm of x, x @ w.T, bias, SwiGLU, residual.

  Args:
    x: [B, K] rows (B <= MAX_BATCH), the compute dtype.
    w: [N, K] output-major weights. With `swiglu`, rows [0, N/2) are the gate and [N/2, N)
      the up projection, and the result is silu(x @ gate.T) * (x @ up.T) [B, N/2].
    norm_scale: [K] RMSNorm scale applied to x first (eps `eps`).
    bias: [N] added to the product (not with swiglu).
    residual: [B, N_out] added last.
    block_n: output columns per block (a power of two dividing N_out).
    programs: None runs one program per block; a number runs that many programs, each
      looping over every `programs`-th block (a persistent grid: sized to the GPU's resident
      programs it avoids a partly filled last wave, and each program loads its next block
      while reducing the current one).
    max_chunk: the widest column chunk a load takes (the largest power of two up to it and
      K); wider chunks give each thread more contiguous elements per load. Where the chunk
      does not divide K, the last one overlaps the one before and masks the overlap.
    name: the kernel's name in profiles (default fused_matvec / fused_matvec_swiglu).

  Returns:
    [B, N_out] in x's dtype.
  """
  batch, k_size = x.shape
  n_rows = w.shape[0]
  n_out = n_rows // 2 if swiglu else n_rows
  if not 1 <= batch <= MAX_BATCH:
    raise ValueError(f"fused_matvec takes 1..{MAX_BATCH} rows, got {batch}")
  if w.shape[1] != k_size:
    raise ValueError(f"w {w.shape} does not contract with x {x.shape} (w is [N, K])")
  if swiglu and (n_rows % 2 or bias is not None):
    raise ValueError("swiglu needs an even number of weight rows and no bias")
  if block_n & (block_n - 1) or n_out % block_n:
    raise ValueError(f"block_n {block_n} must be a power of two dividing {n_out}")
  if k_size < 16 or max_chunk < 16:
    raise ValueError(f"K={k_size} and max_chunk={max_chunk} must be >= 16 (Triton's "
                     "smallest load block)")
  blocks = n_out // block_n
  if programs is not None and not 1 <= programs <= blocks:
    raise ValueError(f"programs must be in [1, {blocks}] (the blocks), got {programs}")
  out_shape = jax.ShapeDtypeStruct((batch, n_out), x.dtype)
  kernel = functools.partial(
      _matvec_kernel, batch=batch, k_size=k_size, max_chunk=max_chunk, eps=float(eps),
      has_norm=norm_scale is not None, has_bias=bias is not None,
      has_residual=residual is not None, swiglu=swiglu, block_n=block_n, blocks=blocks,
      programs=programs)
  if programs is None:  # block views: x, w's block (and the up block), scale, bias, residual
    args = [x, w] + ([w] if swiglu else [])
    in_specs = [pl.BlockSpec((batch, k_size), lambda i: (0, 0)),
                pl.BlockSpec((block_n, k_size), lambda i: (i, 0))]
    if swiglu:
      in_specs.append(pl.BlockSpec((block_n, k_size), lambda i: (i + blocks, 0)))
    optional = [(norm_scale, pl.BlockSpec((k_size,), lambda i: (0,))),
                (bias, pl.BlockSpec((block_n,), lambda i: (i,))),
                (residual, pl.BlockSpec((batch, block_n), lambda i: (0, i)))]
    args += [a for a, _ in optional if a is not None]
    in_specs += [spec for a, spec in optional if a is not None]
    out_specs = pl.BlockSpec((batch, block_n), lambda i: (0, i))
  else:  # a persistent grid indexes whole arrays
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    args = [a for a in (x, w, norm_scale, bias, residual) if a is not None]
    in_specs = [whole(a.shape) for a in args]
    out_specs = whole(out_shape.shape)
  return pl.pallas_call(
      kernel, grid=(programs or blocks,), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, compiler_params=_compiler_params(num_warps, interpret),
      interpret=interpret,
      name=name or ("fused_matvec_swiglu" if swiglu else "fused_matvec"))(*args)


# -------------------------------------------------------------------------- attention


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


def _attention_one_pass_kernel(end_ref, qkv_ref, cos_ref, sin_ref, pos_ref, valid_ref, k_ref,
                               v_ref, out_ref, k_out_ref, v_out_ref, *, groups, num_q_heads,
                               num_kv_heads, head_dim, block_s, d_chunk):
  """One program per (row, query head, chunk of `d_chunk` output dims): the head's whole softmax
  over the cache, online over blocks of `block_s` slots, so no merge kernel follows.

  Each program computes the scores over all D dims (the chunks of a head recompute them) and
  only its chunk of the value sum. The next block's cache loads are issued before the current
  block is reduced; block 0's before anything else.
  """
  f32 = jnp.float32
  b, head, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  h = head // groups
  half = head_dim // 2
  end = end_ref[0]
  lo, hi, dv = pl.ds(0, half), pl.ds(half, half), pl.ds(c * d_chunk, d_chunk)
  neg = jnp.float32(-1e30)
  scale = head_dim**-0.5

  def load(i):  # block i's cached slots (< end), masked
    rows = pl.ds(i * block_s, block_s)
    in_range = i * block_s + jnp.arange(block_s) < end
    mask = in_range[:, None]
    return (plgpu.load(k_ref.at[rows, lo], mask=mask, other=0).astype(f32),
            plgpu.load(k_ref.at[rows, hi], mask=mask, other=0).astype(f32),
            plgpu.load(v_ref.at[rows, dv], mask=mask, other=0).astype(f32),
            in_range & (plgpu.load(valid_ref.at[b, rows], mask=in_range, other=0) != 0))

  first = load(0)
  rotated = _rope_of(qkv_ref, cos_ref, sin_ref, pos_ref, b, head_dim)
  q1, q2 = rotated(head * head_dim)
  k_new = rotated((num_q_heads + h) * head_dim)
  v_offset = (num_q_heads + num_kv_heads + h) * head_dim

  pl.when((head % groups == 0) & (c == 0))(lambda: _store_new_token(
      k_out_ref, v_out_ref, end, k_new, qkv_ref[b, pl.ds(v_offset, head_dim)]))

  # The new token (slot end, taken from qkv) seeds the running statistics: p = exp(0) = 1.
  v_new = qkv_ref[b, pl.ds(v_offset + c * d_chunk, d_chunk)].astype(v_out_ref.dtype).astype(f32)
  new_visible = valid_ref[b, end] != 0
  s_new = _new_token_score((q1, q2), k_new, k_out_ref.dtype, scale)
  m = jnp.where(new_visible, s_new, neg)
  p_new = jnp.where(new_visible, jnp.exp(s_new - m), 0.0)
  stats = (m, p_new, p_new * v_new)

  def update(stats, tiles):
    m, l, acc = stats
    k1, k2, v, visible = tiles
    s = _masked_scores((q1, q2), (k1, k2), visible, scale)
    m_new = jnp.maximum(m, jnp.max(s))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v, axis=0)

  def step(i, carry):
    stats, tiles = carry
    following = load(i + 1)
    return update(stats, tiles), following

  used = jnp.maximum((end + block_s - 1) // block_s, 1)
  stats, last = lax.fori_loop(0, used - 1, step, (stats, first))
  _, l, acc = update(stats, last)
  out_ref[b, pl.ds(head * head_dim + c * d_chunk, d_chunk)] = (
      acc / jnp.maximum(l, 1e-30)).astype(out_ref.dtype)


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
                     num_warps: int | None = None, one_pass: bool = False,
                     d_chunk: int = 32, interpret: bool = False
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
    one_pass: one kernel instead: a program per (row, query head, `d_chunk` output dims) runs
      the whole softmax online over blocks of `block_s` slots (by default the cache, up to
      256), so no merge kernel follows; fewer programs, each streaming more of the cache.

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
    block_s = min(256, max(16, padded)) if one_pass else min(128, max(16, padded // 16))
  if num_warps is None:
    num_warps = 2 if block_s <= 32 else 4
  if block_s & (block_s - 1):
    raise ValueError(f"block_s must be a power of two, got {block_s}")
  if one_pass and (d_chunk & (d_chunk - 1) or head_dim % d_chunk or d_chunk < 16):
    raise ValueError(f"d_chunk must be a power of two >= 16 dividing D={head_dim}, got {d_chunk}")
  end = jnp.reshape(jnp.asarray(end, jnp.int32), (1,))
  positions = positions.astype(jnp.int32)
  valid = valid.astype(jnp.int32)
  groups = num_q_heads // num_kv_heads
  whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  cache_block = pl.BlockSpec((None, cache_len, None, head_dim),
                             lambda b, head, _: (b, 0, head // groups, 0))
  if one_pass:
    kernel = functools.partial(
        _attention_one_pass_kernel, groups=groups, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, block_s=block_s, d_chunk=d_chunk)
    out_shape = (batch, num_q_heads * head_dim)
    out, k_cache, v_cache = pl.pallas_call(
        kernel, grid=(batch, num_q_heads, head_dim // d_chunk),
        in_specs=[whole((1,)), whole(qkv.shape), whole(cos.shape), whole(sin.shape),
                  whole(positions.shape), whole(valid.shape), cache_block, cache_block],
        out_specs=[whole(out_shape), cache_block, cache_block],
        out_shape=[jax.ShapeDtypeStruct(out_shape, qkv.dtype),
                   jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=_compiler_params(num_warps, interpret), interpret=interpret,
        name="decode_attention_one_pass")(end, qkv, cos, sin, positions, valid, k_cache,
                                          v_cache)
    return out, k_cache, v_cache
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


def fused_path_supported(batch: int, hidden: int, intermediate: int, num_q_heads: int,
                         num_kv_heads: int, head_dim: int, block_n: int = 8) -> bool:
  """Whether these shapes fit the fused decode kernels (else the XLA path runs)."""
  qkv = (num_q_heads + 2 * num_kv_heads) * head_dim
  return (1 <= batch <= MAX_BATCH and head_dim & (head_dim - 1) == 0 and head_dim >= 32
          and num_q_heads % num_kv_heads == 0
          and all(n % block_n == 0 for n in (qkv, hidden, intermediate))
          and min(hidden, intermediate, num_q_heads * head_dim) >= 16)
