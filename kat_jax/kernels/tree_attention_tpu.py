"""The `kv_end` tree-attention kernels on Pallas Mosaic TPU (`interpret=True` elsewhere).

Layout [B, H, T, D]; the visible-block lists go in as scalar prefetch and drive the BlockSpec
index maps, the innermost grid axis walks the list. `forward` / `backward` are called by
`kat_jax.kernels.tree_attention`, which owns the public API and the custom VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kat_jax.kernels.tree_attention_blocks import (
    KernelConfig, LOG2E, dot_nn, finalize, online_softmax_step, probs_and_dlogits,
    probs_and_dlogits_t, tile_classes, tile_visible, tile_visible_t, visit_lists)

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
      visible = tile_visible(qb * bq, k_start, kv_end_ref[...], bq, bk)
    carry = (acc_ref[...], m_ref[...], l_ref[...])
    acc, m, l = online_softmax_step(q_ref[...], k_ref[...], v_ref[...], carry, visible,
                                     cfg.scale * LOG2E)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n_visible))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _write():
    out, lse = finalize(acc_ref[...], m_ref[...], l_ref[...])
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
      visible = tile_visible(qb * bq, k_start, kv_end_ref[...], bq, bk)
    k = k_ref[...]
    _, ds = probs_and_dlogits(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                               delta_ref[...], visible, cfg.scale * LOG2E)
    acc_ref[...] += dot_nn(ds.astype(k.dtype), k)

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
      visible_t = tile_visible_t(q_start, kb * bk, kv_end_ref[...], bq, bk)
    q, do = q_ref[...], do_ref[...]
    p_t, ds_t = probs_and_dlogits_t(q, k_ref[...], v_ref[...], do, lse_ref[...],
                                     delta_ref[...], visible_t, cfg.scale * LOG2E)
    dv_acc[...] += dot_nn(p_t.astype(do.dtype), do)
    dk_acc[...] += dot_nn(ds_t.astype(q.dtype), q)

  pl.when(j < n_full)(lambda: step(False))
  pl.when((j >= n_full) & (j < n_visible))(lambda: step(True))

  @pl.when(t == groups * nq - 1)
  def _write():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def forward(q, k, v, kv_end, cfg: KernelConfig):
  """q [B,Hq,T,D], k/v [B,Hkv,T,D], kv_end [B,T] -> o [B,Hq,T,D], lse [B,Hq,T,1] (base 2)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, num_q_heads, length, head_dim = q.shape
  groups = num_q_heads // k.shape[1]
  bq, bk = cfg.tuning.fwd.block_q, cfg.tuning.fwd.block_k
  nq, nk = length // bq, length // bk
  meta = visit_lists(tile_classes(kv_end, bq, bk))
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


def backward(q, k, v, kv_end, do, lse, delta, cfg: KernelConfig):
  """[B,H,T,D] tensors, lse/delta [B,Hq,T,1] f32 -> (dq, dk, dv)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, num_q_heads, length, head_dim = q.shape
  num_kv_heads = k.shape[1]
  groups = num_q_heads // num_kv_heads
  bq, bk = cfg.tuning.dq.block_q, cfg.tuning.dq.block_k
  nq, nk = length // bq, length // bk
  meta_q = visit_lists(tile_classes(kv_end, bq, bk))
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
  meta_k = visit_lists(jnp.swapaxes(tile_classes(kv_end, bq, bk), 1, 2))

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
