"""Tree attention kernels on Pallas Mosaic GPU (Hopper, sm90): forward, dQ and dK/dV.

Backend 'mgpu' of `tree_attention` (same `(q, k, v, kv_end)` interface and custom VJP; the
wiring stays in tree_attention.py).  Same block-sparse schedule as the other backends: per
(query block) or (key block) visit lists from `tree_attention_blocks` (full tiles first, then
partial; hidden tiles never visited).  Built like FlashAttention-3 (arXiv 2407.08608) on Hopper:
- a warpgroup of 128 threads computes 64-row tiles with wgmma (QK^T, PV, ...) whose operands
  sit in 128-byte-swizzled shared memory, accumulating in float32 registers;
- every kernel's program owns block_q (forward, dQ) or block_k (dK/dV) = 64 or 128 rows: 128
  is warp-specialised, two consumer warpgroups of 64 rows and one producer warpgroup that only
  issues TMA copies, with register reallocation (`set_max_registers`) and per-slot "released"
  barriers; 64 is one warpgroup that issues its own copies (`_run_roles`);
- the partner tiles of the visit list (K/V, or Q/dO/lse/delta for dK/dV; 64 or more rows) are
  copied by TMA into a `stages`-deep shared-memory ring: block j + stages is in flight while j
  computes;
- full tiles run without mask arithmetic, partial tiles mask `j <= i < kv_end[j]` with the
  tile's kv_end row (also TMA-copied);
- dK/dV: one program per (key block, kv head) loops over its group's query heads, so GQA
  needs no atomics and no per-query-head buffers.
- optionally (`KernelTiles.ping_pong`, warp-specialised forward and dQ) FA3's ping-pong
  schedule barrier: one consumer's softmax / dS arithmetic overlaps the other's matmuls.
Not used: FA3's fused dQ (the dK/dV kernel adds dS K into dQ by TMA reduce-add, no dQ kernel),
slower on an H100 (docs/tree_attention.md).

Layout [B, T, H, D] (no transposes), lse / delta [B, Hq, T] float32 base 2 (as the Triton
kernels).  Inputs bf16 or f16 (the tensor cores' operand types), D a multiple of 64.

Status: compiled and timed on an H100 (docs/tree_attention.md).
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

__all__ = ["DEFAULT_TUNING", "DTYPES", "ROWS", "SMEM_BYTES", "backward", "check_tiles",
           "dkdv_smem_bytes", "forward"]

ROWS = 64  # rows of one warpgroup MMA: forward/dQ query blocks, dK/dV key blocks
SMEM_BYTES = 232_448  # shared memory of one H100 / H200 thread block (227 KiB)
DTYPES = (jnp.bfloat16, jnp.float16)
# Measured on an H100 (benchmarks/results/tree_attention_mgpu_sweep*_h100.json, anchor
# workload): every kernel warp-specialised, two consumer warpgroups of 64 rows and a TMA
# producer. Forward 128 query rows over 128-key tiles; dQ 128 query rows over 128-key tiles,
# dK/dV 128 key rows over 64-query tiles (fwd+bwd 7.26 / 7.62 ms in two sweeps, the best).
# The forward's ping-pong barrier stays off: 1.79 / 1.98 ms with it against 1.93 / 2.11
# without, in different runs (inconclusive), and Mosaic GPU's CPU interpreter sometimes
# deadlocks on it at 128-key tiles. num_stages = TMA pipeline depth; num_warps unused.
DEFAULT_TUNING = Tuning(fwd=KernelTiles(128, 128, None, 2), dq=KernelTiles(128, 128, None, 2),
                        dkdv=KernelTiles(64, 128, None, 2))


def check_tiles(tuning: Tuning, dtype: Any, head_dim: int) -> None:
  """Raises ValueError unless `tuning` (a `Tuning`) and the inputs fit these kernels."""
  if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
    raise ValueError(f"backend 'mgpu' takes bf16 or f16 q/k/v, got {jnp.dtype(dtype)}")
  if head_dim % 64:
    raise ValueError(f"backend 'mgpu' needs a head dim multiple of 64, got {head_dim}")
  rows = {"fwd.block_q": tuning.fwd.block_q, "dq.block_q": tuning.dq.block_q,
          "dkdv.block_k": tuning.dkdv.block_k}
  for name, size in rows.items():
    if size not in (ROWS, 2 * ROWS):
      raise ValueError(f"backend 'mgpu' needs {name} = {ROWS} (one warpgroup) or {2 * ROWS} "
                       f"(two consumer warpgroups and a producer), got {size}")
  for name, size in {"fwd.block_k": tuning.fwd.block_k, "dq.block_k": tuning.dq.block_k,
                     "dkdv.block_q": tuning.dkdv.block_q}.items():
    if size % 64:
      raise ValueError(f"backend 'mgpu' needs {name} a multiple of 64, got {size}")
  if tuning.dkdv.ping_pong:
    raise ValueError("backend 'mgpu' has ping_pong for the forward and dQ only, not dkdv")
  for name, tiles in {"fwd": tuning.fwd, "dq": tuning.dq}.items():
    if tiles.ping_pong and tiles.block_q != 2 * ROWS:
      raise ValueError(f"backend 'mgpu' needs {name}.block_q = {2 * ROWS} (two consumer "
                       f"warpgroups) for {name}.ping_pong, got {tiles.block_q}")
  need = dkdv_smem_bytes(tuning.dkdv, head_dim, jnp.dtype(dtype).itemsize)
  if need > SMEM_BYTES:
    raise ValueError(
        f"backend 'mgpu': the dK/dV tiles {tuning.dkdv} need {need:,} B of shared memory at "
        f"head dim {head_dim}, more than the {SMEM_BYTES:,} B available: lower "
        f"dkdv.num_stages or dkdv.block_q")


def dkdv_smem_bytes(tiles: KernelTiles, head_dim: int, itemsize: int) -> int:
  """Shared memory of the dK/dV kernel's scratch (each buffer rounded up to the 1 KiB that
  128-byte swizzling aligns to; barriers neglected): the program's K/V blocks, the Q/dO ring
  with lse/delta."""
  consumers, stages = tiles.block_k // ROWS, tiles.num_stages or 2
  buffers = [consumers * ROWS * head_dim * itemsize] * 2 + [consumers * ROWS * 4]
  buffers += [stages * tiles.block_q * head_dim * itemsize] * 2 + [stages * tiles.block_q * 4] * 2
  return sum(-(-size // 1024) * 1024 for size in buffers)


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

  def mma(self, a, b, n: int, *, transpose_b: bool, acc=None, while_running=None):
    """acc + a @ b (or a @ b.T) float32 [ROWS, n]; a [ROWS, K] in smem or registers, b in
    smem.  Returning waits for the MMA, so b's buffer may be refilled afterwards;
    `while_running()` (acc None only) runs between issuing the MMA and waiting for it."""
    plgpu = self.plgpu
    if self.interpret:
      a = a if isinstance(a, jax.Array) else a[...]
      b = b[...].T if transpose_b else b[...]
      out = jnp.dot(a, b, preferred_element_type=jnp.float32)
      if while_running is not None:
        while_running()
      return out if acc is None else acc + out
    b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b
    if acc is None:
      def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        if while_running is not None:
          while_running()
        return acc_ref[...]
      return pl.run_scoped(product, plgpu.ACC((ROWS, n), jnp.float32))

    def accumulate(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
    return pl.run_state(accumulate)(plgpu.ACC.init(acc))

  def mmas(self, *products, while_running=None):
    """Independent MMAs issued together and waited for once (one wgmma wait, not one each):
    products of (a, b, n, transpose_b, acc or None) -> their results, as `mma` gives them."""
    if self.interpret:
      out = tuple(self.mma(a, b, n, transpose_b=t, acc=acc) for a, b, n, t, acc in products)
      if while_running is not None:
        while_running()
      return out
    plgpu = self.plgpu

    def issue(acc_refs):
      for acc_ref, (a, b, _, transpose_b, _) in zip(acc_refs, products):
        plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)) if transpose_b else b)
      if while_running is not None:
        while_running()
    return pl.run_state(issue)(tuple(
        plgpu.ACC.init(self.zeros((ROWS, n)) if acc is None else acc)
        for _, _, n, _, acc in products))


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
  """128-byte-swizzled smem tiles (rows of 128 bytes: 64 16-bit or 32 float32 columns)."""
  tiled = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
           plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, dtype, transforms=tiled)


def _kernel_call(plgpu, body, out_type, grid, names, consumers, interpret, name):
  """pl.kernel over a Mosaic GPU mesh `grid` (named `names`); with consumers > 1, consumers + 1
  warpgroups."""
  threads = dict(num_threads=consumers + 1, thread_name="wg") if consumers > 1 else {}
  mesh = plgpu.Mesh(grid=grid, grid_names=names, kernel_name=name, **threads)
  return pl.kernel(
      body, out_type=out_type, mesh=mesh,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=mgpu_support.interpret_params() if interpret else False, name=name)


# ------------------------------------------------------------------------------------------
# Roles and copies shared by the kernels.  A program owns `consumers` 64-row blocks, one per
# consumer warpgroup, and loops over its visit list with the partner tiles in a `stages`-deep
# shared-memory ring.  consumers = 1: the warpgroup issues its own TMA copies; consumers = 2:
# FlashAttention-3's warp specialisation, a third (producer) warpgroup only issues copies, with
# register reallocation (`set_max_registers`) towards the consumers.  Either way a step
# "releases" each ring's slot after its last read: the single warpgroup then refills it with
# step t + stages itself, consumers arrive on the slot's free barrier, which the producer waits
# on before refilling.  Steps that are not followed by a refill release nothing, so every
# barrier phase has a waiter (Mosaic GPU's interpreter checks that).


def _collective(consumers: int) -> dict:
  """run_scoped's keywords: with a producer, scratch is allocated once for all warpgroups."""
  return dict(collective_axes="wg") if consumers > 1 else {}


class _PingPong:
  """FlashAttention-3's schedule barrier between two consumer warpgroups that run the same
  steps: each step a consumer arrives once after issuing its first MMAs (`issued`, passed as
  `while_running`) and once when its elementwise work is done (`yield_cores`), then waits for
  the other's matching arrival before its last MMA (`take_cores`), so one consumer's
  exp/softmax runs while the other's MMAs hold the tensor cores.  Disabled: all no-ops."""

  def __init__(self, plgpu, barrier, wg, enabled: bool):
    self.plgpu, self.barrier, self.wg, self.enabled = plgpu, barrier, wg, enabled

  def _turn(self):
    self.plgpu.barrier_arrive(self.barrier)
    self.plgpu.barrier_wait(self.barrier)

  def start(self):  # consumer 0 goes first
    if self.enabled:
      pl.when(self.wg == 1)(self._turn)

  def finish(self):  # as many arrivals as consumer 1
    if self.enabled:
      pl.when(self.wg == 0)(self._turn)

  @property
  def issued(self):
    return self._turn if self.enabled else None

  def yield_cores(self, values):
    """values (this step's elementwise results) computed before the arrival."""
    if not self.enabled:
      return values
    values = lax.optimization_barrier(values)
    self.plgpu.barrier_arrive(self.barrier)
    return values

  def take_cores(self):
    if self.enabled:
      self.plgpu.barrier_wait(self.barrier)


def _run_roles(plgpu, consumers: int, wg, n_steps, stages: int, consume, rings) -> None:
  """Runs the program's warpgroups.

  consume(prologue, *releases): one consumer's work; calls `prologue()` once its own copies
  are issued and `releases[r](t, slot)` after step t's last read of ring r.
  rings: [(copy(t, slot), free barriers [stages])], in the order a step first reads them.
  """
  def prologue():
    for stage in range(stages):
      for copy, _ in rings:
        pl.when(stage < n_steps)(functools.partial(copy, stage, stage))

  def release(copy, free, t, slot):
    if consumers == 1:
      pl.when(t + stages < n_steps)(lambda: copy(t + stages, slot))
    else:
      pl.when(t + stages < n_steps)(lambda: plgpu.barrier_arrive(free.at[slot]))

  releases = [functools.partial(release, copy, free) for copy, free in rings]
  if consumers == 1:
    consume(prologue, *releases)
    return

  @pl.when(wg < consumers)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    consume(lambda: None, *releases)

  @pl.when(wg == consumers)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    prologue()

    @pl.loop(0, jnp.maximum(n_steps - stages, 0))
    def _refill(t):
      slot = lax.rem(t, stages)
      for copy, free in rings:
        plgpu.barrier_wait(free.at[slot])
        copy(t + stages, slot)


def _warpgroup(consumers: int) -> jax.Array:
  """This consumer's warpgroup index, always traced: a static 0 indexing a per-consumer
  buffer that `_Ops.mmas` closes over fails Mosaic GPU's lowering in jax 0.11 ("Shaped arrays
  must be represented by ir.Values, got: TypedInt(0)")."""
  return lax.axis_index("wg") if consumers > 1 else lax.axis_index("row") * 0


def _query_program(meta_ref, groups: int, block_k: int, consumers: int):
  """A query-major program's (forward, dQ) ids: (row b, q head h, kv head, query block qb,
  warpgroup wg, n_full, n_visible, key_start(j) = visit step j's first key).  Heaviest (latest)
  query blocks run first."""
  i, h, b = lax.axis_index("q"), lax.axis_index("head"), lax.axis_index("row")
  qb = meta_ref.shape[1] - 1 - i
  wg = _warpgroup(consumers)
  key_start = lambda j: meta_ref[b, qb, 2 + j] * block_k
  return (b, h, lax.div(h, groups), qb, wg, meta_ref[b, qb, 0], meta_ref[b, qb, 1],
          key_start)


def _key_block_copies(plgpu, kv_end_ref, k_ref, v_ref, b, kv_head, key_start, block_k,
                      k_ring, v_ring):
  """-> (copy_k, copy_v)(j, slot): TMA copies of visit step j's key block into the rings
  k_ring = (K buffers, kv_end buffers, ready barriers of 2 arrivals), v_ring = (V buffers,
  ready barriers); key_start(j) = the block's first key."""
  k_smem, end_smem, k_bar = k_ring
  v_smem, v_bar = v_ring

  def copy_k(j, slot):
    k_start = key_start(j)
    plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(k_start, block_k), kv_head], k_smem.at[slot],
                            k_bar.at[slot])
    plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, block_k)], end_smem.at[slot],
                            k_bar.at[slot])

  def copy_v(j, slot):
    plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key_start(j), block_k), kv_head],
                            v_smem.at[slot], v_bar.at[slot])

  return copy_k, copy_v


# ------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, groups,
                block_k, stages, consumers, ping_pong, interpret):
  """Program (query block of consumers x 64 rows, q head, row[, wg]): online softmax over the
  block's visible key blocks, one 64-row half per consumer warpgroup.  The visit list is the
  whole block's; each consumer masks partial tiles with its own rows (a tile full for the
  block is full for every part of it), so both consumers run the same steps.  ping_pong:
  FlashAttention-3's schedule barrier between the two consumers, so that one's softmax runs
  while the other's QK^T / PV use the tensor cores.

  meta_ref [B, nq, 2 + nk] visit lists, kv_end_ref [B, T], q/k/v [B, T, H, D];
  writes o_ref [B, T, Hq, D] and lse_ref [B, Hq, T] (base 2, +inf for rows that see nothing).
  """
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  b, h, kv_head, qb, wg, n_full, n_visible, key_start = _query_program(
      meta_ref, groups, block_k, consumers)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  logit_scale = scale * LOG2E
  tile = (ROWS, block_k)

  def body(qo_smem2, k_smem, v_smem, end_smem, lse_smem2, q_bar, k_bar, v_bar, k_free,
           v_free, turn_bar):
    copy_k, copy_v = _key_block_copies(plgpu, kv_end_ref, k_ref, v_ref, b, kv_head, key_start,
                                       block_k, (k_smem, end_smem, k_bar), (v_smem, v_bar))

    turns = _PingPong(plgpu, turn_bar, wg, ping_pong)

    def consume(prologue, release_k, release_v):
      qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
      q_start = (qb * consumers + wg) * ROWS
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, ROWS), h], qo_smem, q_bar.at[wg])
      prologue()
      plgpu.barrier_wait(q_bar.at[wg])
      turns.start()

      def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s = ops.mma(qo_smem, k_smem.at[slot], block_k, transpose_b=True,
                    while_running=turns.issued) * logit_scale
        if masked:
          key_ends = _key_ends_row(ops, end_smem.at[slot], tile)
          s = jnp.where(_visible(ops, q_start, key_start(j), key_ends, tile), s, -jnp.inf)
        release_k(j, slot)  # K and its kv_end slice are read
        p, alpha, m_next, l = _online_softmax(s, m, l, masked)
        acc, p, m_next, l = turns.yield_cores(
            (acc * _col(alpha, (ROWS, head_dim)), p.astype(dtype), m_next, l))
        plgpu.barrier_wait(v_bar.at[slot])
        turns.take_cores()
        acc = ops.mma(p, v_smem.at[slot], head_dim, transpose_b=False, acc=acc)
        release_v(j, slot)
        return acc, m_next, l

      carry = (ops.zeros((ROWS, head_dim)), ops.row_stat(-jnp.inf), ops.row_stat(0.0))
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), carry)
      turns.finish()
      qo_smem[...], lse_smem[...] = _finish(acc, m, l, dtype)  # q's buffer is free now
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q_start, ROWS), h])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_start, ROWS)])
      plgpu.wait_smem_to_gmem(0)

    _run_roles(plgpu, consumers, wg, n_visible, stages, consume,
               [(copy_k, k_free), (copy_v, v_free)])

  kv_buffer = _smem_tiles(plgpu, (stages, block_k, head_dim), dtype)
  released = plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)
  pl.run_scoped(
      body, _smem_tiles(plgpu, (consumers, ROWS, head_dim), dtype), kv_buffer, kv_buffer,
      plgpu.SMEM((stages, block_k), jnp.int32), plgpu.SMEM((consumers, ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=consumers), plgpu.Barrier(num_arrivals=2, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages), released, released,
      plgpu.Barrier(num_arrivals=consumers), **_collective(consumers))


def forward(q: jax.Array, k: jax.Array, v: jax.Array, kv_end: jax.Array, cfg: KernelConfig
            ) -> tuple[jax.Array, jax.Array]:
  """q [B,T,Hq,D], k/v [B,T,Hkv,D], kv_end [B,T] (T padded to the blocks)
  -> (o [B,T,Hq,D], lse [B,Hq,T] float32 base 2)."""
  scale, tiles, interpret = cfg.scale, cfg.tuning.fwd, cfg.interpret
  plgpu = mgpu_support.plgpu()
  batch, length, num_q_heads, _ = q.shape
  consumers = tiles.block_q // ROWS
  kernel = functools.partial(
      _fwd_kernel, scale=scale, groups=num_q_heads // k.shape[2], block_k=tiles.block_k,
      stages=tiles.num_stages or 2, consumers=consumers, ping_pong=tiles.ping_pong,
      interpret=interpret)
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, num_q_heads, length), jnp.float32))
  meta = visit_lists(tile_classes(kv_end, tiles.block_q, tiles.block_k))
  return _kernel_call(plgpu, kernel, out_type, (length // tiles.block_q, num_q_heads, batch),
                      ("q", "head", "row"), consumers, interpret, "tree_attention_fwd_mgpu"
                      )(meta, kv_end, q, k, v)


# ------------------------------------------------------------------------------------------
# Backward: dQ per query block, dK/dV per key block.  With `consumers` = 2 a program owns two
# 64-row blocks (one per consumer warpgroup) and a producer warpgroup issues the partner
# tiles' copies (the warp-specialised forward's schedule); with 1 the single warpgroup issues
# its own copies.  Either way a step ends by "releasing" a ring slot's buffers: the one
# warpgroup refills the slot itself, consumers arrive on its free barrier for the producer.


def _dq_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, scale, groups, block_k, stages, consumers, ping_pong, interpret):
  """Program (query block of consumers x 64 rows, q head, row[, wg]): dQ = scale * sum over
  the visible key blocks of dS K, one 64-row block per consumer warpgroup (both consumers run
  the block's visit list; ping_pong: `_PingPong` around the dS arithmetic)."""
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  b, h, kv_head, qb, wg, n_full, n_visible, key_start = _query_program(
      meta_ref, groups, block_k, consumers)
  head_dim = q_ref.shape[-1]
  dtype = q_ref.dtype
  logit_scale = scale * LOG2E
  tile = (ROWS, block_k)

  def body(q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem, end_smem, q_bar, k_bar,
           v_bar, k_free, v_free, turn_bar):
    copy_k, copy_v = _key_block_copies(plgpu, kv_end_ref, k_ref, v_ref, b, kv_head, key_start,
                                       block_k, (k_smem, end_smem, k_bar), (v_smem, v_bar))
    turns = _PingPong(plgpu, turn_bar, wg, ping_pong)

    def consume(prologue, release_k, release_v):
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_start = (qb * consumers + wg) * ROWS
      q_rows = (b, pl.ds(q_start, ROWS), h)
      plgpu.copy_gmem_to_smem(q_ref.at[q_rows], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[q_rows], do_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(q_start, ROWS)], lse_smem2.at[wg],
                              q_bar.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(q_start, ROWS)], delta_smem2.at[wg],
                              q_bar.at[wg])
      prologue()
      plgpu.barrier_wait(q_bar.at[wg])
      lse = _col(ops.load_vector(lse_smem2.at[wg], along_rows=True), tile)
      delta = _col(ops.load_vector(delta_smem2.at[wg], along_rows=True), tile)
      turns.start()

      def step(j, dq, masked):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        s, dp = ops.mmas((q_smem, k_smem.at[slot], block_k, True, None),
                         (do_smem, v_smem.at[slot], block_k, True, None),
                         while_running=turns.issued)
        release_v(j, slot)
        p = jnp.exp2(s * logit_scale - lse)
        if masked:
          key_ends = _key_ends_row(ops, end_smem.at[slot], tile)
          p = jnp.where(_visible(ops, q_start, key_start(j), key_ends, tile), p, 0.0)
        ds = turns.yield_cores((p * (dp - delta)).astype(dtype))
        turns.take_cores()
        dq = ops.mma(ds, k_smem.at[slot], head_dim, transpose_b=False, acc=dq)
        release_k(j, slot)
        return dq

      dq = ops.zeros((ROWS, head_dim))
      dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_full, n_visible, functools.partial(step, masked=True), dq)
      turns.finish()
      q_smem[...] = (dq * scale).astype(dtype)  # q's buffer is free: the last MMA has waited
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[q_rows])
      plgpu.wait_smem_to_gmem(0)

    _run_roles(plgpu, consumers, wg, n_visible, stages, consume,
               [(copy_k, k_free), (copy_v, v_free)])

  kv_buffer = _smem_tiles(plgpu, (stages, block_k, head_dim), dtype)
  q_buffer = _smem_tiles(plgpu, (consumers, ROWS, head_dim), dtype)
  vector = plgpu.SMEM((consumers, ROWS), jnp.float32)
  released = plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)
  pl.run_scoped(
      body, q_buffer, q_buffer, vector, vector, kv_buffer, kv_buffer,
      plgpu.SMEM((stages, block_k), jnp.int32),
      plgpu.Barrier(num_arrivals=4, num_barriers=consumers),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_barriers=stages),
      released, released, plgpu.Barrier(num_arrivals=consumers), **_collective(consumers))


def _dkdv_kernel(meta_ref, kv_end_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, scale, groups, block_q, stages, consumers, interpret):
  """Program (key block of consumers x 64 rows, kv head, row[, wg]): dK, dV over the group's
  query heads and the block's visible query blocks, computed key-major (P^T, dS^T [64 keys,
  block_q queries]), one 64-key block per consumer warpgroup."""
  ops = _Ops(interpret)
  plgpu = ops.plgpu
  kb, h, b = lax.axis_index("k"), lax.axis_index("head"), lax.axis_index("row")
  wg = _warpgroup(consumers)
  head_dim = k_ref.shape[-1]
  dtype = k_ref.dtype
  n_full, n_visible = meta_ref[b, kb, 0], meta_ref[b, kb, 1]
  steps = groups * n_visible  # (group head, visit step) pairs, one pipeline over all of them
  logit_scale = scale * LOG2E
  tile = (ROWS, block_q)

  def query_rows(t):
    """Step t's query tile: (first row, q head)."""
    g, j = lax.div(t, n_visible), lax.rem(t, n_visible)
    return meta_ref[b, kb, 2 + j] * block_q, h * groups + g

  def body(k_smem2, v_smem2, end_smem2, q_smem, do_smem, lse_smem, delta_smem, k_bar, q_bar,
           do_bar, q_free, do_free):
    def copy_q(t, slot):  # Q and its lse
      q_start, q_head = query_rows(t)
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, block_q), q_head], q_smem.at[slot],
                              q_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[b, q_head, pl.ds(q_start, block_q)],
                              lse_smem.at[slot], q_bar.at[slot])

    def copy_do(t, slot):  # dO and its delta
      q_start, q_head = query_rows(t)
      plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(q_start, block_q), q_head], do_smem.at[slot],
                              do_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[b, q_head, pl.ds(q_start, block_q)],
                              delta_smem.at[slot], do_bar.at[slot])

    def consume(prologue, release_q, release_do):
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      k_start = (kb * consumers + wg) * ROWS
      k_rows = (b, pl.ds(k_start, ROWS), h)
      plgpu.copy_gmem_to_smem(k_ref.at[k_rows], k_smem, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[k_rows], v_smem, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(kv_end_ref.at[b, pl.ds(k_start, ROWS)], end_smem2.at[wg],
                              k_bar.at[wg])
      prologue()
      plgpu.barrier_wait(k_bar.at[wg])
      key_ends = _col(ops.load_vector(end_smem2.at[wg], along_rows=True), tile)

      def step(j, carry, g, masked):
        dk, dv = carry
        t = g * n_visible + j
        slot = lax.rem(t, stages)
        plgpu.barrier_wait(q_bar.at[slot])
        lse = _row(ops.load_vector(lse_smem.at[slot], along_rows=False), tile)
        p_t = jnp.exp2(ops.mma(k_smem, q_smem.at[slot], block_q, transpose_b=True)
                       * logit_scale - lse)
        if masked:
          q_start = meta_ref[b, kb, 2 + j] * block_q
          p_t = jnp.where(_visible(ops, q_start, k_start, key_ends, tile, keys_on_rows=True),
                          p_t, 0.0)
        plgpu.barrier_wait(do_bar.at[slot])
        delta = _row(ops.load_vector(delta_smem.at[slot], along_rows=False), tile)
        dv, dp_t = ops.mmas((p_t.astype(dtype), do_smem.at[slot], head_dim, False, dv),
                            (v_smem, do_smem.at[slot], block_q, True, None))
        release_do(t, slot)
        ds_t = p_t * (dp_t - delta)
        dk = ops.mma(ds_t.astype(dtype), q_smem.at[slot], head_dim, transpose_b=False, acc=dk)
        release_q(t, slot)
        return dk, dv

      def group_step(g, carry):
        carry = lax.fori_loop(0, n_full, functools.partial(step, g=g, masked=False), carry)
        return lax.fori_loop(n_full, n_visible, functools.partial(step, g=g, masked=True),
                             carry)

      carry = (ops.zeros((ROWS, head_dim)), ops.zeros((ROWS, head_dim)))
      dk, dv = lax.fori_loop(0, groups, group_step, carry)
      k_smem[...] = (dk * scale).astype(dtype)  # K/V buffers are free: the last MMA has waited
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[k_rows])
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[k_rows])
      plgpu.wait_smem_to_gmem(0)

    _run_roles(plgpu, consumers, wg, steps, stages, consume,
               [(copy_q, q_free), (copy_do, do_free)])

  k_buffer = _smem_tiles(plgpu, (consumers, ROWS, head_dim), dtype)
  q_buffer = _smem_tiles(plgpu, (stages, block_q, head_dim), dtype)
  vector = plgpu.SMEM((stages, block_q), jnp.float32)
  ready = plgpu.Barrier(num_arrivals=2, num_barriers=stages)
  released = plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)
  pl.run_scoped(
      body, k_buffer, k_buffer, plgpu.SMEM((consumers, ROWS), jnp.int32), q_buffer, q_buffer,
      vector, vector, plgpu.Barrier(num_arrivals=3, num_barriers=consumers), ready, ready,
      released, released, **_collective(consumers))


def backward(q: jax.Array, k: jax.Array, v: jax.Array, kv_end: jax.Array, do: jax.Array,
             lse: jax.Array, delta: jax.Array, cfg: KernelConfig
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Padded [B,T,H,D] tensors, lse/delta [B,Hq,T] f32 (base-2 lse) -> (dq, dk, dv)."""
  scale, tuning, interpret = cfg.scale, cfg.tuning, cfg.interpret
  plgpu = mgpu_support.plgpu()
  batch, length, num_q_heads, _ = q.shape
  num_kv_heads = k.shape[2]
  groups = num_q_heads // num_kv_heads
  args = (q, k, v, do, lse, delta)

  tiles = tuning.dq
  consumers = tiles.block_q // ROWS
  dq_kernel = functools.partial(
      _dq_kernel, scale=scale, groups=groups, block_k=tiles.block_k,
      stages=tiles.num_stages or 2, consumers=consumers, ping_pong=tiles.ping_pong,
      interpret=interpret)
  dq = _kernel_call(
      plgpu, dq_kernel, jax.ShapeDtypeStruct(q.shape, q.dtype),
      (length // tiles.block_q, num_q_heads, batch), ("q", "head", "row"), consumers,
      interpret, "tree_attention_dq_mgpu"
  )(visit_lists(tile_classes(kv_end, tiles.block_q, tiles.block_k)), kv_end, *args)

  tiles = tuning.dkdv
  consumers = tiles.block_k // ROWS
  dkdv_kernel = functools.partial(
      _dkdv_kernel, scale=scale, groups=groups, block_q=tiles.block_q,
      stages=tiles.num_stages or 2, consumers=consumers, interpret=interpret)
  meta_k = visit_lists(jnp.swapaxes(tile_classes(kv_end, tiles.block_q, tiles.block_k), 1, 2))
  dk, dv = _kernel_call(
      plgpu, dkdv_kernel,
      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      (length // tiles.block_k, num_kv_heads, batch), ("k", "head", "row"), consumers,
      interpret, "tree_attention_dkdv_mgpu")(meta_k, kv_end, *args)
  return dq, dk, dv
