"""Block-sparse Pallas attention under the `kv_end` visibility rule (prefix trees, packed docs).

Query `i` attends key `j` iff `j <= i < kv_end[j]` (see `reference.py`).  The sequence is cut
into query blocks `[qs, qe)` and key blocks `[ks, ke)`.  From the per-key-block min / max of
`kv_end` every tile is classed once, outside the kernels:

  hidden   ks > qe - 1  or  max(kv_end[ks:ke]) <= qs          -> never touched
  full     ke - 1 <= qs and min(kv_end[ks:ke]) >= qe          -> no mask arithmetic
  partial  otherwise                                           -> element mask

Each query block (and, for dK/dV, each key block) gets a compact list of its visible partner
blocks, full ones first, so the kernels loop only over visible tiles: hidden tiles cost nothing.

Backends (`backend=`):
  'gpu'  Pallas on Triton; layout stays [B, T, H, D]; one program per (query block, batch, head)
         loops over its visible key blocks (online softmax in float32, FlashAttention-2 style).
  'tpu'  Pallas Mosaic TPU; layout [B, H, T, D]; the visible-block lists go in as scalar
         prefetch and drive the BlockSpec index maps, the innermost grid axis walks the list
         (steps past its end repeat the last block index, so no DMA, and skip compute).
  'mgpu' Pallas Mosaic GPU (Hopper): TMA pipelines, wgmma, warp specialisation
         (tree_attention_mgpu.py); what 'auto' picks on a Hopper GPU for bf16/f16 inputs.
All run on CPU with `interpret=True` (the tests do).  The backward pass is two kernels: dQ
(per query block, like the forward) and dK/dV (per key block, looping over the group's query
heads and the visible query blocks), with `delta = rowsum(dO * O)` computed in plain JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kat_jax.kernels import mgpu_support, tree_attention_mgpu, tree_attention_tpu, tree_attention_triton
from kat_jax.kernels.tree_attention_blocks import KernelConfig, KernelTiles, Tuning, tile_classes

__all__ = ["DEFAULT_TUNING", "KernelTiles", "Tuning", "tile_classes", "tree_attention"]

_BACKENDS = ("auto", "gpu", "tpu", "mgpu")


# Measured on an H100 (benchmarks/tree_attention.py, docs/tree_attention.md): 128x128 forward
# tiles with 8 warps; 64x64 backward tiles with 4 warps (larger dK/dV tiles spill registers).
DEFAULT_TUNING = Tuning(fwd=KernelTiles(128, 128, 8, 2), dq=KernelTiles(64, 64, 4, 2),
                        dkdv=KernelTiles(64, 64, 4, 2))
# float32 tiles take twice the shared memory: 128x128 forward tiles with D=128 overflow the
# H100's 227 KiB (measured), so 4-byte inputs with D > 64 default to 64x64 tiles everywhere.
# (f32, D=64 with DEFAULT_TUNING is verified on the H100; f32 D=128 with these tiles is not.)
DEFAULT_TUNING_F32_WIDE = Tuning(*(KernelTiles(64, 64, 4, 2),) * 3)


# ------------------------------------------------------------------------------------------
# custom_vjp wiring.  Inputs here are already padded to a multiple of every block size.


def _to_heads_major(x):
  return jnp.swapaxes(x, 1, 2)


def _forward(q, k, v, kv_end, cfg: KernelConfig):
  """-> (out [B,T,Hq,D], lse [B,Hq,T] f32 base 2)."""
  if cfg.backend == "tpu":
    t = _to_heads_major
    out, lse = tree_attention_tpu.forward(t(q), t(k), t(v), kv_end, cfg)
    return _to_heads_major(out), lse[..., 0]
  if cfg.backend == "mgpu":
    return tree_attention_mgpu.forward(q, k, v, kv_end, cfg)
  return tree_attention_triton.forward(q, k, v, kv_end, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tree_attention(q, k, v, kv_end, cfg: KernelConfig):
  return _forward(q, k, v, kv_end, cfg)[0]


def _tree_attention_fwd(q, k, v, kv_end, cfg: KernelConfig):
  out, lse = _forward(q, k, v, kv_end, cfg)
  return out, (q, k, v, kv_end, out, lse)


def _tree_attention_bwd(cfg: KernelConfig, residuals, d_out):
  q, k, v, kv_end, out, lse = residuals
  # delta_i = sum_d dO * O: the softmax-Jacobian term, one cheap fused pass in XLA.
  delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_out = d_out.astype(q.dtype)
  if cfg.backend == "tpu":
    t = _to_heads_major
    dq, dk, dv = tree_attention_tpu.backward(t(q), t(k), t(v), kv_end, t(d_out),
                                             lse[..., None], delta[..., None], cfg)
    dq, dk, dv = t(dq), t(dk), t(dv)
  elif cfg.backend == "mgpu":
    dq, dk, dv = tree_attention_mgpu.backward(q, k, v, kv_end, d_out, lse, delta, cfg)
  else:
    dq, dk, dv = tree_attention_triton.backward(q, k, v, kv_end, d_out, lse, delta, cfg)
  return dq, dk, dv, None


_tree_attention.defvjp(_tree_attention_fwd, _tree_attention_bwd)


# ------------------------------------------------------------------------------------------
# Public entry point.


def default_backend(dtype: jnp.dtype, head_dim: int) -> str:
  """The backend 'auto' picks for inputs of `dtype` and `head_dim` on the default device.

  'tpu' on TPU; 'mgpu' on a Hopper GPU for the inputs it takes (bf16/f16, head dim a multiple
  of 64): on an H100 it ran the anchor tree 1.35x (forward) and 1.15x (forward+backward)
  faster than the Triton kernel (benchmarks/results/tree_attention_mgpu_h100.json); else
  'gpu' (Triton).
  """
  if jax.default_backend() == "tpu":
    return "tpu"
  if (mgpu_support.is_hopper() and head_dim % 64 == 0
      and jnp.dtype(dtype) in map(jnp.dtype, tree_attention_mgpu.DTYPES)):
    return "mgpu"
  return "gpu"


def _check_block(name: str, size: int):
  if size < 16 or size & (size - 1):
    raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def _validate(q, k, v, kv_end):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
  batch, length, num_q_heads, head_dim = q.shape
  if k.shape[:2] != (batch, length) or k.shape[3] != head_dim:
    raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, length or head dim")
  if num_q_heads % k.shape[2]:
    raise ValueError(f"query heads {num_q_heads} not a multiple of kv heads {k.shape[2]}")
  if head_dim & (head_dim - 1) or head_dim < 16:
    raise ValueError(f"head dim must be a power of two >= 16, got {head_dim}")
  if kv_end.shape != (batch, length):
    raise ValueError(f"kv_end must be [B, T] = {(batch, length)}, got {kv_end.shape}")
  if not jnp.issubdtype(kv_end.dtype, jnp.integer):
    raise ValueError(f"kv_end must be an integer array, got {kv_end.dtype}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _pad_length(x: jax.Array, length: int, value=0) -> jax.Array:
  pad = length - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def tree_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_end: jax.Array,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    tuning: Tuning | None = None,
    backend: str = "auto",
    interpret: bool = False,
) -> jax.Array:
  """Block-sparse attention where query i sees key j iff j <= i < kv_end[j].

  Args:
    q: [B, T, Hq, D] queries (bf16 or f32; D a power of two, e.g. 64 or 128).
    k: [B, T, Hkv, D] keys; Hq a multiple of Hkv (grouped-query attention).
    v: [B, T, Hkv, D] values.
    kv_end: [B, T] int32, one past the last query allowed to see each key.
    scale: softmax scale, default D**-0.5.
    block_q, block_k: tile sizes (powers of two >= 16) of all three kernels; when both are
      None, `tuning` (default `DEFAULT_TUNING`) sets them per kernel.  T is padded to a
      multiple of every block size.
    tuning: per-kernel tiles and Triton launch parameters (see `Tuning`); exclusive with
      block_q / block_k.
    backend: 'auto' (`default_backend`: TPU on TPU; Mosaic GPU on Hopper for bf16/f16 inputs
      with D a multiple of 64 unless tiles are passed; else Triton), 'gpu' (Triton), 'tpu' or
      'mgpu' (Mosaic GPU, Hopper; bf16/f16, D a multiple of 64; default tuning
      `tree_attention_mgpu.DEFAULT_TUNING`).
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    [B, T, Hq, D] in q's dtype; differentiable in q, k, v (Pallas backward kernels).
  """
  _validate(q, k, v, kv_end)
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
  if backend == "auto":
    explicit_tiles = block_q is not None or block_k is not None or tuning is not None
    # Tiles passed by the caller were chosen for one backend: keep 'auto' off 'mgpu' then.
    backend = default_backend(q.dtype, q.shape[-1])
    if backend == "mgpu" and explicit_tiles:
      backend = "gpu"
  if block_q is not None or block_k is not None:
    if tuning is not None:
      raise ValueError("pass either block_q/block_k or tuning, not both")
    tiles = KernelTiles(block_q or 128, block_k or 128)
    tuning = Tuning(tiles, tiles, tiles)
  elif tuning is None and backend == "mgpu":
    tuning = tree_attention_mgpu.DEFAULT_TUNING
  elif tuning is None:
    wide_f32 = jnp.dtype(q.dtype).itemsize >= 4 and q.shape[-1] > 64
    tuning = DEFAULT_TUNING_F32_WIDE if wide_f32 else DEFAULT_TUNING
  multiple = 1
  for kernel_name, tiles in zip(Tuning._fields, tuning):
    _check_block(f"{kernel_name}.block_q", tiles.block_q)
    _check_block(f"{kernel_name}.block_k", tiles.block_k)
    if tiles.ping_pong and backend != "mgpu":
      raise ValueError(f"{kernel_name}.ping_pong needs backend 'mgpu', got {backend!r}")
    multiple = max(multiple, tiles.block_q, tiles.block_k)  # powers of two: max is the lcm
  if backend == "mgpu":
    tree_attention_mgpu.check_tiles(tuning, q.dtype, q.shape[-1])
  length = q.shape[1]
  padded = pl.cdiv(length, multiple) * multiple
  cfg = KernelConfig(scale=float(q.shape[-1]**-0.5 if scale is None else scale),
                backend=backend, interpret=bool(interpret), tuning=tuning)
  # Padded keys get kv_end 0 (seen by nobody); padded queries see nothing and get dO = 0.
  out = _tree_attention(_pad_length(q, padded), _pad_length(k, padded), _pad_length(v, padded),
                        _pad_length(kv_end.astype(jnp.int32), padded), cfg)
  return out[:, :length]
