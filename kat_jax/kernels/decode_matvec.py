"""Fused matrix-vector products for decoding a few rows at a time (Pallas on Triton;
`interpret=True` on CPU): optional RMSNorm of x, x @ w.T, bias, SwiGLU, residual in one kernel.

Weights are output-major (`w [N, K]`, the HF layout), so each program reads whole contiguous
rows. `matvec_reference` is the plain-JAX definition `fused_matvec` is tested against.
Overview of the decode kernels: `kat_jax.kernels.decode`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kat_jax.kernels.reference import rms_norm

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
