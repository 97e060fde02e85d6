"""Kernel-vs-reference comparison shared by the kernel tests and the GPU benchmark."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kat_jax.kernels.reference import attention_reference
from kat_jax.kernels.tree_attention import tree_attention


def kernel_and_reference(q: jax.Array, k: jax.Array, v: jax.Array, d_out: jax.Array,
                         kv_end: jax.Array, **kernel_kwargs
                         ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{'out'|'dq'|'dk'|'dv': (kernel value, reference value)} for the same inputs.

  The reference runs on float32 copies at the highest matmul precision; the kernel in the
  inputs' dtype with `kernel_kwargs` (tuning, backend, interpret, ...).
  """
  kernel = jax.jit(lambda q, k, v: tree_attention(q, k, v, kv_end, **kernel_kwargs))
  out, vjp = jax.vjp(kernel, q, k, v)
  grads = vjp(d_out)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, kv_end),
                           f32(q), f32(k), f32(v))
    ref_grads = ref_vjp(f32(d_out))
  return {name: (got, want) for name, got, want in
          zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
