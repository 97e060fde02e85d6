"""The `kv_end` tree-attention kernels on Pallas Triton (GPU; `interpret=True` on CPU).

Layout [B, T, H, D]; one program per (query block, batch, head) loops over its visible key
blocks (online softmax in float32, FlashAttention-2 style). `forward` / `backward` are called
by `kat_jax.kernels.tree_attention`, which owns the public API and the custom VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kat_jax.kernels.tree_attention_blocks import (
    KernelConfig, KernelTiles, LOG2E, dot_nn, finalize, online_softmax_step, probs_and_dlogits,
    probs_and_dlogits_t, tile_classes, tile_visible, tile_visible_t, visit_lists)

# ------------------------------------------------------------------------------------------
# GPU (Triton) kernels: layout [B, T, H, D], loops inside the kernel.


def _gpu_fwd_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg, nq):
  bq, bk, head_dim = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k, q_ref.shape[-1]
  qb = nq - 1 - pl.program_id(0)  # heaviest query blocks (latest) first
  q_start = qb * bq
  q = q_ref[...]
  logit_scale = cfg.scale * LOG2E

  def step(j, carry, masked):
    k_start = pl.multiple_of(meta_ref[2 + j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    visible = None
    if masked:
      key_ends = kv_end_ref[pl.ds(k_start, bk)][None, :]
      visible = tile_visible(q_start, k_start, key_ends, bq, bk)
    return online_softmax_step(q, k, v, carry, visible, logit_scale)

  carry = (jnp.zeros((bq, head_dim), jnp.float32),
           jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  n_full, n_visible = meta_ref[0], meta_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)
  out, lse = finalize(*carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _gpu_dq_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, *, cfg, nq):
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  qb = nq - 1 - pl.program_id(0)
  q_start = qb * bq
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  logit_scale = cfg.scale * LOG2E

  def step(j, dq, masked):
    k_start = pl.multiple_of(meta_ref[2 + j] * bk, bk)
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    visible = None
    if masked:
      key_ends = kv_end_ref[pl.ds(k_start, bk)][None, :]
      visible = tile_visible(q_start, k_start, key_ends, bq, bk)
    _, ds = probs_and_dlogits(q, k, v, do, lse, delta, visible, logit_scale)
    return dq + dot_nn(ds.astype(k.dtype), k)

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
  logit_scale = cfg.scale * LOG2E

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
    visible_t = tile_visible_t(q_start, k_start, key_ends, bq, bk) if masked else None
    p_t, ds_t = probs_and_dlogits_t(q, k, v, do, lse_row[None, :], delta_row[None, :],
                                     visible_t, logit_scale)
    dv = dv + dot_nn(p_t.astype(do.dtype), do)
    dk = dk + dot_nn(ds_t.astype(q.dtype), q)
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


def _gpu_compiler_params(cfg: KernelConfig, tiles: KernelTiles, head_dim: int):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  num_warps = tiles.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages or 2)


def forward(q, k, v, kv_end, cfg: KernelConfig):
  """q [B,T,Hq,D], k/v [B,T,Hkv,D], kv_end [B,T] (T padded) -> o [B,T,Hq,D], lse [B,Hq,T]."""
  batch, length, num_q_heads, head_dim = q.shape
  groups = num_q_heads // k.shape[2]
  bq, bk = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k
  nq = length // bq
  meta = visit_lists(tile_classes(kv_end, bq, bk))
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


def backward(q, k, v, kv_end, do, lse, delta, cfg: KernelConfig):
  """Padded tensors in, (dq, dk, dv) out; lse/delta [B, Hq, T] f32."""
  batch, length, num_q_heads, head_dim = q.shape
  num_kv_heads = k.shape[2]
  groups = num_q_heads // num_kv_heads
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  nq = length // bq
  meta_q = visit_lists(tile_classes(kv_end, bq, bk))

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
  meta_k = visit_lists(jnp.swapaxes(tile_classes(kv_end, bq, bk), 1, 2))

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
