"""Block metadata of the tree attention kernels (plain JAX, computed once per call).

Shared by every backend of `tree_attention`: the tile classifier and the per-block visit lists
that drive the block-sparse loops (see docs/tree_attention.md, "Tiling and block sparsity").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tile_classes(kv_end: jax.Array, block_q: int, block_k: int) -> jax.Array:
  """Class of every (query block, key block) tile: 0 full, 1 partial, 2 hidden.

  Args:
    kv_end: [B, T] int32 with T a multiple of both block sizes.
  Returns:
    [B, T // block_q, T // block_k] int32.
  """
  batch, length = kv_end.shape
  nq, nk = length // block_q, length // block_k
  key_ends = kv_end.reshape(batch, nk, block_k)
  kmin = key_ends.min(-1)[:, None, :]
  kmax = key_ends.max(-1)[:, None, :]
  qs = (jnp.arange(nq) * block_q)[None, :, None]
  qe = qs + block_q
  ks = (jnp.arange(nk) * block_k)[None, None, :]
  ke = ks + block_k
  hidden = (ks > qe - 1) | (kmax <= qs)
  full = (ke - 1 <= qs) & (kmin >= qe)
  return jnp.where(hidden, 2, jnp.where(full, 0, 1)).astype(jnp.int32)


def visit_lists(classes: jax.Array) -> jax.Array:
  """[B, R, C] tile classes -> [B, R, 2 + C] int32 rows `[n_full, n_visible, c_0, c_1, ...]`.

  The column list holds full tiles first, then partial ones, then hidden ones (never visited).
  """
  order = jnp.argsort(classes, axis=-1, stable=True).astype(jnp.int32)
  n_full = jnp.sum(classes == 0, axis=-1, dtype=jnp.int32)[..., None]
  n_visible = jnp.sum(classes < 2, axis=-1, dtype=jnp.int32)[..., None]
  return jnp.concatenate([n_full, n_visible, order], axis=-1)
