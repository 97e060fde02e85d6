"""The one attention dispatch point: every backend takes the same (q, k, v, kv_end).

`kv_end=None` means plain causal attention over the row. Backends:
- `reference`: plain JAX, any `kv_end` (kat_jax.kernels.reference);
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')`, plain causal rows only;
- `tree`: the Pallas tree-attention kernel, any `kv_end`, block-sparse (its own `auto`: the
  Mosaic GPU kernel on Hopper for bf16/f16, Triton on other GPUs, Mosaic TPU on TPU);
- `tree_mgpu`: the Mosaic GPU kernel explicitly (Hopper, bf16/f16);
- `auto`: `reference` on CPU; on GPU `cudnn` for causal rows and `tree` otherwise; `tree` on TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kat_jax.kernels.reference import attention_reference, causal_kv_end


def resolve_backend(backend: str, causal: bool, dtype=jnp.bfloat16) -> str:
  """Picks the concrete backend for `auto` from the default JAX platform and the dtype."""
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "gpu":  # cuDNN's fused attention takes 16-bit inputs only
    return "cudnn" if causal and jnp.dtype(dtype).itemsize == 2 else "tree"
  if platform == "tpu":
    return "tree"
  return "reference"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_end: jax.Array | None, *,
           backend: str = "auto", scale: float | None = None) -> jax.Array:
  """q [B,T,Hq,D], k/v [B,T,Hkv,D], kv_end [B,T] int32 or None -> [B,T,Hq,D]."""
  batch, length = q.shape[:2]
  backend = resolve_backend(backend, causal=kv_end is None, dtype=q.dtype)
  if backend == "cudnn":
    if kv_end is not None:
      raise ValueError("attention backend 'cudnn' handles plain causal rows only (kv_end=None);"
                       " use 'tree' or 'reference' for packed/tree rows")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        implementation="cudnn")
  if kv_end is None:
    kv_end = causal_kv_end(batch, length)
  if backend == "tree":
    from kat_jax.kernels import tree_attention  # pylint: disable=g-import-not-at-top
    return tree_attention(q, k, v, kv_end, scale=scale)
  if backend == "tree_mgpu":
    from kat_jax.kernels import tree_attention  # pylint: disable=g-import-not-at-top
    return tree_attention(q, k, v, kv_end, scale=scale, backend="mgpu")
  if backend == "reference":
    return attention_reference(q, k, v, kv_end, scale=scale)
  raise ValueError(f"unknown attention backend {backend!r}")
