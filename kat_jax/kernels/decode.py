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

The products live in `decode_matvec.py`, attention in `decode_attention.py`; this module
re-exports them. Weights are output-major (`w [N, K]`, the HF layout), so each program reads
whole contiguous rows. Each `*_reference` beside a kernel is the plain-JAX definition it is
tested against.
Rounding follows the XLA path (`kat_jax.sampling.forward`): products accumulate in float32 and
round to the compute dtype where the XLA path's einsums do.
"""

from __future__ import annotations

from kat_jax.kernels.decode_attention import decode_attention, decode_attention_reference
from kat_jax.kernels.decode_matvec import MAX_BATCH, fused_matvec, matvec_reference

__all__ = ["MAX_BATCH", "decode_attention", "decode_attention_reference", "fused_matvec",
           "fused_path_supported", "matvec_reference"]


def fused_path_supported(batch: int, hidden: int, intermediate: int, num_q_heads: int,
                         num_kv_heads: int, head_dim: int, block_n: int = 8) -> bool:
  """Whether these shapes fit the fused decode kernels (else the XLA path runs)."""
  qkv = (num_q_heads + 2 * num_kv_heads) * head_dim
  return (1 <= batch <= MAX_BATCH and head_dim & (head_dim - 1) == 0 and head_dim >= 32
          and num_q_heads % num_kv_heads == 0
          and all(n % block_n == 0 for n in (qkv, hidden, intermediate))
          and min(hidden, intermediate, num_q_heads * head_dim) >= 16)
