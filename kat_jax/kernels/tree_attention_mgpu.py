"""Tree attention kernels on Pallas Mosaic GPU (Hopper, sm90): forward, dQ and dK/dV.

Backend 'mgpu' of `tree_attention` (same `(q, k, v, kv_end)` interface and custom VJP; the
wiring stays in tree_attention.py).  Same block-sparse schedule as the other backends: per
(query block) or (key block) visit lists from `tree_attention_blocks` (full tiles first, then partial;
hidden tiles never visited).  Built like FlashAttention-3 (arXiv 2407.08608) on Hopper:
- a warpgroup of 128 threads computes 64-row tiles with wgmma (QK^T, PV, ...) whose operands
  sit in 128-byte-swizzled shared memory, accumulating in float32 registers;
- forward with fwd.block_q = 128 (the default): warp-specialised, two consumer warpgroups of
  64 rows and one producer warpgroup that only issues TMA copies, with register reallocation
  (`set_max_registers`) and per-slot "released" barriers; fwd.block_q = 64: one warpgroup
  that issues its own copies (as the backward kernels do);
- the partner tiles of the visit list (K/V, or Q/dO/lse/delta for dK/dV) are copied by TMA
  into a `stages`-deep shared-memory ring: block j + stages is in flight while j computes;
- full tiles run without mask arithmetic, partial tiles mask `j <= i < kv_end[j]` with the
  tile's kv_end row (also TMA-copied);
- dK/dV: one program per (key block, kv head) loops over its group's query heads, so GQA
  needs no atomics and no per-query-head buffers.
Not done yet (next steps, see docs/tree_attention.md): warp specialisation of the backward
kernels, FA3's ping-pong schedule barrier between the consumers, and the dQ fused into the
dK/dV pass.

Layout [B, T, H, D] (no transposes), lse / delta [B, Hq, T] float32 base 2 (as the Triton
kernels).  Inputs bf16 or f16 (the tensor cores' operand types), D a multiple of 64.

Status: lowers for CUDA on CPU (tests); NOT yet run on a GPU, so `backend="auto"` does not
pick it — pass `backend="mgpu"` explicitly until the GPU tests have passed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kat_jax.kernels import mgpu_support
from kat_jax.kernels.tree_attention_blocks import KernelConfig
from kat_jax.kernels.tree_attention_blocks import KernelTiles
from kat_jax.kernels.tree_attention_blocks import LOG2E
from kat_jax.kernels.tree_attention_blocks import tile_classes
from kat_jax.kernels.tree_attention_blocks import Tuning
from kat_jax.kernels.tree_attention_blocks import visit_lists

__all__ = ["DEFAULT_TUNING", "DTYPES", "ROWS", "backward", "check_tiles", "forward"]

ROWS = 64  # rows of one warpgroup MMA: forward/dQ query blocks, dK/dV key blocks
DTYPES = (jnp.bfloat16, jnp.float16)
# 64-row tiles per warpgroup; the forward's 128 query rows are two consumer warpgroups of 64
# (warp-specialised; fwd.block_q=64 picks the one-warpgroup kernel) over 128-key tiles with
# 2 TMA stages: the fastest config of JAX's attention_mgpu on the H200. num_stages = TMA
# pipeline depth; num_warps unused. Not yet tuned on a GPU.
DEFAULT_TUNING = Tuning(fwd=KernelTiles(128, 128, None, 2), dq=KernelTiles(64, 64, None, 2),
                        dkdv=KernelTiles(64, 64, None, 2))


def check_tiles(tuning: Tuning, dtype: Any, head_dim: int) -> None:
  """Raises ValueError unless `tuning` (a `Tuning`) and the inputs fit these kernels."""
  if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
    raise ValueError(f"backend 'mgpu' takes bf16 or f16 q/k/v, got {jnp.dtype(dtype)}")
  if head_dim % 64:
    raise ValueError(f"backend 'mgpu' needs a head dim multiple of 64, got {head_dim}")
  if tuning.fwd.block_q not in (ROWS, 2 * ROWS):
    raise ValueError(f"backend 'mgpu' needs fwd.block_q = {ROWS} (one warpgroup) or "
                     f"{2 * ROWS} (two consumer warpgroups), got {tuning.fwd.block_q}")
  rows = {"dq.block_q": tuning.dq.block_q, "dkdv.block_k": tuning.dkdv.block_k}
  for name, size in rows.items():
    if size != ROWS:
      raise ValueError(f"backend 'mgpu' needs {name} = {ROWS} (one warpgroup MMA), got {size}")
  for name, size in {"fwd.block_k": tuning.fwd.block_k, "dq.block_k": tuning.dq.block_k,
                     "dkdv.block_q": tuning.dkdv.block_q}.items():
    if size % 64:
      raise ValueError(f"backend 'mgpu' needs {name} a multiple of 64, got {size}")


class _Ops:
  """The few Mosaic GPU operations whose form differs between compiled and interpreted runs
  (the interpreter has no register layouts and no wgmma of these operands)."""

  def __init__(self, interpret: bool):
    self.interpret = interpret
    self.plgpu = mgpu_support.plgpu()

  def layout(self, x, layout):
    return x if self.interpret else self.plgpu.layout_cast(x, layout)

  def zeros(self, shape):
    return self.layout(jnp.zeros(shape, jnp.float32), self.plgpu.Layout.WGMMA)

  def row_stat(self, value):
    """[ROWS] per-row statistic (m, l) in the reduced-columns layout."""
    return self.layout(jnp.full((ROWS,), value, jnp.float32),
                       self.plgpu.Layout.WGMMA.reduce(1))

  def iota(self, shape, dim):
    return self.layout(lax.broadcasted_iota(jnp.int32, shape, dim), self.plgpu.Layout.WGMMA)

  def load_vector(self, ref, along_rows: bool):
    """A 1-D smem vector laid out to broadcast along the tile's rows (one value per row) or
    columns."""
    if self.interpret:
      return ref[...]
    reduced = 1 if along_rows else 0
    return self.plgpu.load(ref, (), layout=self.plgpu.Layout.WGMMA.reduce(reduced))

  def mma(self, a, b, n: int, *, transpose_b: bool, acc=None):
    """acc + a @ b (or a @ b.T) float32 [ROWS, n]; a [ROWS, K] in smem or registers, b in
    smem.  Returning waits for the MMA, so b's buffer may be refilled afterwards."""
    plgpu = self.plgpu
    if self.interpret:
      a = a if isinstance(a, jax.Array) else a[...]
      b = b[...].T if transpose_b else b[...]
      out = jnp.dot(a, b, preferred_element_type=jnp.float32)
      return out if acc is None else acc + out
    b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b
    if acc is None:
      def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
      return pl.run_scoped(product, plgpu.ACC((ROWS, n), jnp.float32))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _col(x, shape):
  """[rows] -> [rows, cols] broadcast along columns."""
  return lax.broadcast_in_dim(x, shape, [0])


def _row(x, shape):
  """[cols] -> [rows, cols] broadcast along rows."""
  return lax.broadcast_in_dim(x, shape, [1])


def _visible(ops: _Ops, q_start, k_start, key_ends, tile, keys_on_rows: bool = False):
  """Partial-tile mask j <= i < kv_end[j] of a [rows, cols] tile; key_ends broadcast to it."""
  q_pos = q_start + ops.iota(tile, 1 if keys_on_rows else 0)
  k_pos = k_start + ops.iota(tile, 0 if keys_on_rows else 1)
  return (k_pos <= q_pos) & (q_pos < key_ends)


def _key_ends_row(ops: _Ops, end_ref, tile):
  """A key block's kv_end slice [cols] in smem, broadcast down the rows of a query-major tile."""
  return _row(ops.load_vector(end_ref, along_rows=False), tile)


def _online_softmax(s, m, l, masked: bool):
  """One tile of the base-2 online softmax: s [rows, cols] scaled logits (-inf where
  hidden), m / l [rows] running max and sum -> (p, alpha, m_next, l_next)."""
  m_next = jnp.maximum(m, s.max(axis=1))
  # Only a masked tile can leave a row with m = -inf; shift it by 0 so exp2 gives 0, not NaN.
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(s - _col(m_safe, s.shape))
  return p, alpha, m_next, l * alpha + p.sum(axis=1)


def _finish(acc, m, l, dtype):
  """-> (out [rows, D] in dtype, lse [rows] base 2, +inf for rows that saw no key)."""
  seen = l > 0.0
  out = (acc / _col(jnp.where(seen, l, 1.0), acc.shape)).astype(dtype)
  return out, jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)


def _smem_tiles(plgpu, shape, dtype):
  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, dtype, transforms=tiled)


def _kernel_call(plgpu, body, out_type, grid, names, interpret, name):
  return plgpu.kernel(
      body, out_type=out_type, grid=grid, grid_names=names,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=mgpu_support.interpret_params() if interpret else False, kernel_name=name)


# ------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, groups,
                block_k, stages, interpret):
  """Program (query block, q head, row): online softmax over the block's visible key blocks.

  meta_ref [B, nq, 2 + nk] visit lists, kv_end_ref [B, T], q/k/v [B, T, H, D];
  writes o_ref [B, T, Hq, D] and lse_ref [B, Hq, T] (base 2, +inf for rows that see nothing).
  """
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  nq = meta_ref.shape[1]
  i, h, b = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("row")
  qb = nq - 1 - i  # heaviest (latest) query blocks first
  q_start = qb * ROWS
  kv_head = lax.div(h, groups)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  n_full, n_visible = meta_ref[b, qb, 0], meta_ref[b, qb, 1]
  logit_scale = scale * LOG2E
  tile = (ROWS, block_k)

  def attend(q_smem, k_smem, v_smem, end_smem, q_bar, k_bar, v_bar):
    def issue(j, slot):
      k_start = meta_ref[b, qb, 2 + j] * block_k
      rows = (b, pl.ds(k_start, block_k), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, block_k)], end_smem.at[slot],
                              k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, ROWS), h], q_smem, q_bar)
    for stage in range(stages):
      pl.when(stage < n_visible)(functools.partial(issue, stage, stage))
    plgpu.barrier_wait(q_bar)

    def step(j, carry, masked):
      acc, m, l = carry
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      s = ops.mma(q_smem, k_smem.at[slot], block_k, transpose_b=True) * logit_scale
      if masked:
        k_start = meta_ref[b, qb, 2 + j] * block_k
        key_ends = _key_ends_row(ops, end_smem.at[slot], tile)
        s = jnp.where(_visible(ops, q_start, k_start, key_ends, tile), s, -jnp.inf)
      p, alpha, m_next, l = _online_softmax(s, m, l, masked)
      plgpu.barrier_wait(v_bar.at[slot])
      acc = ops.mma(p.astype(dtype), v_smem.at[slot], head_dim, transpose_b=False,
                    acc=acc * _col(alpha, (ROWS, head_dim)))
      pl.when(j + stages < n_visible)(lambda: issue(j + stages, slot))
      return acc, m_next, l

    carry = (ops.zeros((ROWS, head_dim)), ops.row_stat(-jnp.inf), ops.row_stat(0.0))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    return lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)

  kv_buffer = _smem_tiles(plgpu, (stages, block_k, head_dim), dtype)
  acc, m, l = pl.run_scoped(
      attend, _smem_tiles(plgpu, (ROWS, head_dim), dtype), kv_buffer, kv_buffer,
      plgpu.SMEM((stages, block_k), jnp.int32), plgpu.Barrier(),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_barriers=stages))

  def store(o_smem, lse_smem):
    o_smem[...], lse_smem[...] = _finish(acc, m, l, dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(q_start, ROWS), h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, _smem_tiles(plgpu, (ROWS, head_dim), dtype),
                plgpu.SMEM((ROWS,), jnp.float32))


def _fwd_ws_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale,
                   groups, block_k, stages, interpret):
  """Warp-specialised forward (FlashAttention-3's schedule): program (128-row query block,
  q head, row) with three warpgroups: two consumers of 64 rows each and one producer that
  only issues TMA copies, refilling a ring slot once both consumers have released it.
  The visit list is the 128-row block's; each consumer masks partial tiles with its own rows
  (a tile full for the block is full for both halves)."""
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  nq = meta_ref.shape[1]
  i, h, b = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("row")
  wg = lax.axis_index("wg")
  qb = nq - 1 - i
  kv_head = lax.div(h, groups)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  n_full, n_visible = meta_ref[b, qb, 0], meta_ref[b, qb, 1]
  logit_scale = scale * LOG2E
  tile = (ROWS, block_k)

  def body(qo_smem2, k_smem, v_smem, end_smem, lse_smem2, q_bar, k_bar, v_bar, k_free,
           v_free):
    @pl.when(wg < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
      q_start = qb * 2 * ROWS + wg * ROWS
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, ROWS), h], qo_smem, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])

      def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s = ops.mma(qo_smem, k_smem.at[slot], block_k, transpose_b=True) * logit_scale
        if masked:
          k_start = meta_ref[b, qb, 2 + j] * block_k
          key_ends = _key_ends_row(ops, end_smem.at[slot], tile)
          s = jnp.where(_visible(ops, q_start, k_start, key_ends, tile), s, -jnp.inf)
        plgpu.barrier_arrive(k_free.at[slot])  # K and its kv_end slice are read
        p, alpha, m_next, l = _online_softmax(s, m, l, masked)
        plgpu.barrier_wait(v_bar.at[slot])
        acc = ops.mma(p.astype(dtype), v_smem.at[slot], head_dim, transpose_b=False,
                      acc=acc * _col(alpha, (ROWS, head_dim)))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_next, l

      carry = (ops.zeros((ROWS, head_dim)), ops.row_stat(-jnp.inf), ops.row_stat(0.0))
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)
      qo_smem[...], lse_smem[...] = _finish(acc, m, l, dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q_start, ROWS), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, ROWS)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def copy_k(j, slot):
        k_start = meta_ref[b, qb, 2 + j] * block_k
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(k_start, block_k), kv_head], k_smem.at[slot],
                                k_bar.at[slot])
        plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, block_k)], end_smem.at[slot],
                                k_bar.at[slot])

      def copy_v(j, slot):
        k_start = meta_ref[b, qb, 2 + j] * block_k
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(k_start, block_k), kv_head], v_smem.at[slot],
                                v_bar.at[slot])

      for stage in range(stages):
        @pl.when(stage < n_visible)
        def _prologue(stage=stage):
          copy_k(stage, stage)
          copy_v(stage, stage)

      @pl.loop(0, jnp.maximum(n_visible - stages, 0))
      def _refill(j):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_free.at[slot])
        copy_k(j + stages, slot)
        plgpu.barrier_wait(v_free.at[slot])
        copy_v(j + stages, slot)

  kv_buffer = _smem_tiles(plgpu, (stages, block_k, head_dim), dtype)
  released = plgpu.Barrier(num_arrivals=2, num_barriers=stages)  # both consumers
  pl.run_scoped(
      body, _smem_tiles(plgpu, (2, ROWS, head_dim), dtype), kv_buffer, kv_buffer,
      plgpu.SMEM((stages, block_k), jnp.int32), plgpu.SMEM((2, ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages), released, released, collective_axes="wg")


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_end: jax.Array, cfg: KernelConfig
            ) -> tuple[jax.Array, jax.Array]:
  """q [B,T,Hq,D], k/v [B,T,Hkv,D], kv_end [B,T] (T padded to the blocks)
  -> (o [B,T,Hq,D], lse [B,Hq,T] float32 base 2)."""
  scale, tuning, interpret = cfg.scale, cfg.tuning, cfg.interpret
  plgpu = mgpu_support.plgpu()
  batch, length, num_q_heads, head_dim = q.shape
  tiles = tuning.fwd
  nq = length // tiles.block_q
  meta = visit_lists(tile_classes(kv_end, tiles.block_q, tiles.block_k))
  warp_specialized = tiles.block_q == 2 * ROWS
  kernel = functools.partial(
      _fwd_ws_kernel if warp_specialized else _fwd_kernel, scale=scale,
      groups=num_q_heads // k.shape[2], block_k=tiles.block_k, stages=tiles.num_stages or 2,
      interpret=interpret)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, num_q_heads, length), jnp.float32))
  call = plgpu.kernel(
      kernel, out_type=out_type, grid=(nq, num_q_heads, batch), grid_names=("q", "head", "row"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=mgpu_support.interpret_params() if interpret else False,
      kernel_name="tree_attention_fwd_mgpu",
      **(dict(num_threads=3, thread_name="wg") if warp_specialized else {}))
  return call(meta, kv_end, q, k, v)


# ------------------------------------------------------------------------------------------
# Backward: dQ per query block, dK/dV per key block.


def _dq_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, scale, groups, block_k, stages, interpret):
  """Program (query block, q head, row): dQ = scale * sum over visible key blocks of dS K."""
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  nq = meta_ref.shape[1]
  i, h, b = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("row")
  qb = nq - 1 - i
  q_start = qb * ROWS
  kv_head = lax.div(h, groups)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  n_full, n_visible = meta_ref[b, qb, 0], meta_ref[b, qb, 1]
  logit_scale = scale * LOG2E
  tile = (ROWS, block_k)

  def gradient(q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, end_smem, q_bar, k_bar,
               v_bar):
    def issue(j, slot):
      k_start = meta_ref[b, qb, 2 + j] * block_k
      rows = (b, pl.ds(k_start, block_k), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, block_k)], end_smem.at[slot],
                              k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_bar.at[slot])

    q_rows = (b, pl.ds(q_start, ROWS), h)
    plgpu.copy_gmem_to_smem(q_ref.at[q_rows], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(do_ref.at[q_rows], do_smem, q_bar)
    plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q_start, ROWS)], lse_smem, q_bar)
    plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q_start, ROWS)], delta_smem, q_bar)
    for stage in range(stages):
      pl.when(stage < n_visible)(functools.partial(issue, stage, stage))
    plgpu.barrier_wait(q_bar)
    lse = _col(ops.load_vector(lse_smem, along_rows=True), tile)
    delta = _col(ops.load_vector(delta_smem, along_rows=True), tile)

    def step(j, dq, masked):
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      p = jnp.exp2(ops.mma(q_smem, k_smem.at[slot], block_k, transpose_b=True) * logit_scale
                   - lse)
      if masked:
        k_start = meta_ref[b, qb, 2 + j] * block_k
        key_ends = _key_ends_row(ops, end_smem.at[slot], tile)
        p = jnp.where(_visible(ops, q_start, k_start, key_ends, tile), p, 0.0)
      plgpu.barrier_wait(v_bar.at[slot])
      dp = ops.mma(do_smem, v_smem.at[slot], block_k, transpose_b=True)
      ds = p * (dp - delta)
      dq = ops.mma(ds.astype(dtype), k_smem.at[slot], head_dim, transpose_b=False, acc=dq)
      pl.when(j + stages < n_visible)(lambda: issue(j + stages, slot))
      return dq

    dq = ops.zeros((ROWS, head_dim))
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    return lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), dq)

  kv_buffer = _smem_tiles(plgpu, (stages, block_k, head_dim), dtype)
  q_buffer = _smem_tiles(plgpu, (ROWS, head_dim), dtype)
  dq = pl.run_scoped(
      gradient, q_buffer, q_buffer, plgpu.SMEM((ROWS,), jnp.float32),
      plgpu.SMEM((ROWS,), jnp.float32), kv_buffer, kv_buffer,
      plgpu.SMEM((stages, block_k), jnp.int32), plgpu.Barrier(num_arrivals=4),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_barriers=stages))

  def store(dq_smem):
    dq_smem[...] = (dq * scale).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[b, pl.ds(q_start, ROWS), h])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, q_buffer)


def _dkdv_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, scale, groups, block_q, stages, interpret):
  """Program (key block, kv head, row): dK, dV over the group's query heads and the block's
  visible query blocks, computed key-major (P^T, dS^T [ROWS keys, block_q queries])."""
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  kb, h, b = lax.axis_index("k"), lax.axis_index("head"), lax.axis_index("row")
  k_start = kb * ROWS
  head_dim = k_ref.shape[-1]
  dtype = k_ref.dtype
  n_full, n_visible = meta_ref[b, kb, 0], meta_ref[b, kb, 1]
  steps = groups * n_visible  # (group head, visit step) pairs, one pipeline over all of them
  logit_scale = scale * LOG2E
  tile = (ROWS, block_q)

  def gradient(k_smem, v_smem, end_smem, q_smem, do_smem, lse_smem, delta_smem, k_bar, q_bar):
    def issue(t, slot):
      g, j = lax.div(t, n_visible), lax.rem(t, n_visible)
      q_start = meta_ref[b, kb, 2 + j] * block_q
      q_head = h * groups + g
      rows = (b, pl.ds(q_start, block_q), q_head)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, q_head, pl.ds(q_start, block_q)],
                              lse_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, q_head, pl.ds(q_start, block_q)],
                              delta_smem.at[slot], q_bar.at[slot])

    k_rows = (b, pl.ds(k_start, ROWS), h)
    plgpu.copy_gmem_to_smem(k_ref.at[k_rows], k_smem, k_bar)
    plgpu.copy_gmem_to_smem(v_ref.at[k_rows], v_smem, k_bar)
    plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, ROWS)], end_smem, k_bar)
    for stage in range(stages):
      pl.when(stage < steps)(functools.partial(issue, stage, stage))
    plgpu.barrier_wait(k_bar)
    key_ends = _col(ops.load_vector(end_smem, along_rows=True), tile)

    def step(j, carry, g, masked):
      dk, dv = carry
      t = g * n_visible + j
      slot = lax.rem(t, stages)
      plgpu.barrier_wait(q_bar.at[slot])
      lse = _row(ops.load_vector(lse_smem.at[slot], along_rows=False), tile)
      delta = _row(ops.load_vector(delta_smem.at[slot], along_rows=False), tile)
      p_t = jnp.exp2(ops.mma(k_smem, q_smem.at[slot], block_q, transpose_b=True) * logit_scale
                     - lse)
      if masked:
        q_start = meta_ref[b, kb, 2 + j] * block_q
        p_t = jnp.where(_visible(ops, q_start, k_start, key_ends, tile, keys_on_rows=True),
                        p_t, 0.0)
      dv = ops.mma(p_t.astype(dtype), do_smem.at[slot], head_dim, transpose_b=False, acc=dv)
      dp_t = ops.mma(v_smem, do_smem.at[slot], block_q, transpose_b=True)
      ds_t = p_t * (dp_t - delta)
      dk = ops.mma(ds_t.astype(dtype), q_smem.at[slot], head_dim, transpose_b=False, acc=dk)
      pl.when(t + stages < steps)(lambda: issue(t + stages, slot))
      return dk, dv

    def group_step(g, carry):
      carry = lax.fori_loop(0, n_full, functools.partial(step, g=g, masked=False), carry)
      return lax.fori_loop(n_full, n_visible, functools.partial(step, g=g, masked=True), carry)

    carry = (ops.zeros((ROWS, head_dim)), ops.zeros((ROWS, head_dim)))
    return lax.fori_loop(0, groups, group_step, carry)

  k_buffer = _smem_tiles(plgpu, (ROWS, head_dim), dtype)
  q_buffer = _smem_tiles(plgpu, (stages, block_q, head_dim), dtype)
  vector = plgpu.SMEM((stages, block_q), jnp.float32)
  dk, dv = pl.run_scoped(
      gradient, k_buffer, k_buffer, plgpu.SMEM((ROWS,), jnp.int32), q_buffer, q_buffer, vector,
      vector, plgpu.Barrier(num_arrivals=3),
      plgpu.Barrier(num_arrivals=4, num_barriers=stages))

  def store(dk_smem, dv_smem):
    dk_smem[...] = (dk * scale).astype(dtype)
    dv_smem[...] = dv.astype(dtype)
    plgpu.commit_smem()
    rows = (b, pl.ds(k_start, ROWS), h)
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(store, k_buffer, k_buffer)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv_end: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, cfg: KernelConfig
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Padded [B,T,H,D] tensors, lse/delta [B,Hq,T] f32 (base-2 lse) -> (dq, dk, dv)."""
  scale, tuning, interpret = cfg.scale, cfg.tuning, cfg.interpret
  plgpu = mgpu_support.plgpu()
  batch, length, num_q_heads, _ = q.shape
  num_kv_heads = k.shape[2]
  groups = num_q_heads // num_kv_heads
  block_k = tuning.dq.block_k
  meta_q = visit_lists(tile_classes(kv_end, ROWS, block_k))
  dq_kernel = functools.partial(
      _dq_kernel, scale=scale, groups=groups, block_k=block_k,
      stages=tuning.dq.num_stages or 2, interpret=interpret)
  dq = _kernel_call(
      plgpu, dq_kernel, jax.ShapeDtypeStruct(q.shape, q.dtype),
      (length // ROWS, num_q_heads, batch), ("q", "head", "row"), interpret,
      "tree_attention_dq_mgpu")(meta_q, kv_end, q, k, v, do, lse, delta)

  block_q = tuning.dkdv.block_q
  meta_k = visit_lists(jnp.swapaxes(tile_classes(kv_end, block_q, ROWS), 1, 2))
  dkdv_kernel = functools.partial(
      _dkdv_kernel, scale=scale, groups=groups, block_q=block_q,
      stages=tuning.dkdv.num_stages or 2, interpret=interpret)
  dk, dv = _kernel_call(
      plgpu, dkdv_kernel,
      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      (length // ROWS, num_kv_heads, batch), ("k", "head", "row"), interpret,
      "tree_attention_dkdv_mgpu")(meta_k, kv_end, q, k, v, do, lse, delta)
  return dq, dk, dv
