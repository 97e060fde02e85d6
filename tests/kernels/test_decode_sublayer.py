"""The attention sublayer as one kernel (`decode_attention_sublayer`) vs its plain-JAX
reference and vs the per-product kernels it replaces.

Interpret mode on CPU runs the programs one at a time in id order, so every wait there is
already satisfied; the compiled kernel's waits (and its dispatch-order assumption) are checked
by the GPU test, which also reads the timeout flag.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels.decode import (HEAD_BLOCKS, HEADS_MERGED, QKV_DONE, TIMED_OUT,
                                    attention_sublayer_reference, decode_attention,
                                    decode_attention_sublayer, fused_matvec, sublayer_counters)
from kat_jax.model.layers import rope_cos_sin
from kat_jax.testing import relative_error

_HAS_GPU = jax.default_backend() == "gpu"
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(seed, batch, d, hq, hkv, head_dim, cache_len, end, dtype, bias):
  keys = jax.random.split(jax.random.key(seed), 10)
  n_qkv = (hq + 2 * hkv) * head_dim
  normal = lambda k, shape, scale=1.0: (scale * jax.random.normal(k, shape)).astype(dtype)
  layer = {"input_norm": (1.0 + 0.2 * jax.random.normal(keys[0], (d,))).astype(dtype),
           "qkv": normal(keys[1], (n_qkv, d), d**-0.5),
           "o": normal(keys[2], (d, hq * head_dim), (hq * head_dim)**-0.5)}
  if bias:
    layer["qkv_bias"] = normal(keys[3], (n_qkv,))
  h = normal(keys[4], (batch, d))
  k_cache = normal(keys[5], (batch, cache_len, hkv, head_dim))
  v_cache = normal(keys[6], (batch, cache_len, hkv, head_dim))
  valid = np.array(jax.random.bernoulli(keys[7], 0.7, (batch, cache_len)))
  valid[:, end + 1:] = False
  valid[:, end] = True
  positions = jax.random.randint(keys[8], (batch, 1), 0, 1000)
  cos, sin = rope_cos_sin(positions, head_dim, 10000.0, dtype)
  return h, layer, cos[:, 0, 0], sin[:, 0, 0], k_cache, v_cache, jnp.asarray(valid)


def _per_product(h, layer, cos, sin, k_cache, v_cache, valid, end, *, num_q_heads, eps,
                 block_s, max_chunk):
  """The same sublayer through fused_matvec / decode_attention / fused_matvec, on the tiles
  of the sublayer kernel's phases (CPU reductions follow the tile shape)."""
  qkv = fused_matvec(h, layer["qkv"], norm_scale=layer["input_norm"], eps=eps,
                     bias=layer.get("qkv_bias"), block_n=8, max_chunk=max_chunk,
                     interpret=True)
  out, k_cache, v_cache = decode_attention(qkv, cos, sin, k_cache, v_cache, valid, end,
                                           num_q_heads=num_q_heads, block_s=block_s,
                                           interpret=True)
  return (fused_matvec(out, layer["o"], residual=h, block_n=4, max_chunk=max_chunk,
                       interpret=True),
          k_cache, v_cache)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch, hq, hkv, end, cache_len, bias", [
    (1, 4, 2, 0, 40, True),  # only the new token
    (3, 6, 2, 37, 50, False),  # 3 of 4 slot blocks used, cache_len not a multiple of 16
    (2, 4, 1, 49, 50, True),  # the last slot
])
def test_sublayer_matches_reference_and_per_product_kernels(dtype, batch, hq, hkv, end,
                                                            cache_len, bias):
  d, head_dim, eps = 64, 32, 1e-6
  args = _inputs(end, batch, d, hq, hkv, head_dim, cache_len, end, dtype, bias)
  tiles = dict(qkv=8, o=4, block_s=16, max_chunk=32)
  counters = sublayer_counters(2, batch, hq)
  got = decode_attention_sublayer(*args, jnp.int32(end), counters, layer_index=1,
                                  num_q_heads=hq, eps=eps, tiles=tiles, interpret=True)
  want = attention_sublayer_reference(*args, jnp.int32(end), num_q_heads=hq, eps=eps)
  for name, g, w in zip(("h", "k_cache", "v_cache"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert relative_error(g, w) < _TOL[dtype], name
  # Same program bodies as the per-product kernels: the same numbers, to float32's last bits
  # (XLA on CPU may contract the interpreted bodies differently in the two programs).
  chain = _per_product(*args, jnp.int32(end), num_q_heads=hq, eps=eps, block_s=16,
                       max_chunk=32)
  for name, g, c in zip(("h", "k_cache", "v_cache"), got, chain):
    assert relative_error(g.astype(jnp.float32), c.astype(jnp.float32)) < {
        jnp.float32: 1e-6, jnp.bfloat16: 4e-3}[dtype], name
  # Every program counted itself: the q/k/v programs, each head's used blocks, the merges.
  counts = np.asarray(got[3])
  used = max(1, -(-end // 16))
  assert counts[0].sum() == 0  # the other layer's row is untouched
  assert counts[1, QKV_DONE] == (hq + 2 * hkv) * head_dim // 8
  assert counts[1, HEADS_MERGED] == batch * hq
  assert counts[1, TIMED_OUT] == 0
  np.testing.assert_array_equal(counts[1, HEAD_BLOCKS:], used)


def test_sublayer_clear_errors():
  args = _inputs(0, 2, 64, 4, 2, 32, 40, 3, jnp.float32, False)
  counters = sublayer_counters(1, 2, 4)
  run = lambda counters, **kw: decode_attention_sublayer(
      *args, jnp.int32(3), counters, layer_index=kw.pop("layer_index", 0), num_q_heads=4,
      eps=1e-6, interpret=True, **kw)
  with pytest.raises(ValueError, match="counters"):
    run(sublayer_counters(1, 1, 4))
  with pytest.raises(ValueError, match="counters"):
    run(counters, layer_index=1)
  with pytest.raises(ValueError, match="tiles"):
    run(counters, tiles=dict(o=3))
  with pytest.raises(ValueError, match="query heads"):
    decode_attention_sublayer(*args, jnp.int32(3), counters, layer_index=0, num_q_heads=2,
                              eps=1e-6, interpret=True)


def test_sublayer_lowers_to_triton_on_cpu():
  """The compiled kernel (spin waits, atomics, the three phases) lowers to Triton IR at
  Qwen2.5-1.5B shapes without a GPU (PTX compilation does not run here)."""
  from jax import export  # pylint: disable=g-import-not-at-top
  dt, b, s, hq, hkv, hd, d = jnp.bfloat16, 1, 300, 12, 2, 128, 1536
  spec = lambda shape, t=dt: jax.ShapeDtypeStruct(shape, t)
  n_qkv = (hq + 2 * hkv) * hd
  layer = {"input_norm": spec((d,)), "qkv": spec((n_qkv, d)), "qkv_bias": spec((n_qkv,)),
           "o": spec((d, hq * hd))}
  fn = lambda *a: decode_attention_sublayer(*a, layer_index=3, num_q_heads=hq, eps=1e-6)
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
      spec((b, d)), layer, spec((b, hd)), spec((b, hd)), spec((b, s, hkv, hd)),
      spec((b, s, hkv, hd)), spec((b, s), jnp.bool_), spec((), jnp.int32),
      spec((28, HEAD_BLOCKS + b * hq), jnp.int32))
  assert "xla.gpu.triton" in exported.mlir_module()


@pytest.mark.skipif(not _HAS_GPU, reason="needs a GPU (the compiled kernel's waits; run with "
                    "KAT_TEST_GPU=1); the CPU tests above run it interpreted")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("batch, end", [(1, 200), (2, 511)])
def test_gpu_sublayer_qwen_shapes(dtype, batch, end):
  d, hq, hkv, head_dim, eps = 1536, 12, 2, 128, 1e-6  # qwen2.5-1.5b
  args = _inputs(7, batch, d, hq, hkv, head_dim, 512, end, dtype, True)
  counters = sublayer_counters(28, batch, hq)
  for layer_index in (0, 27):  # a fresh row per call, as the decode step uses them
    got = decode_attention_sublayer(*args, jnp.int32(end), counters, layer_index=layer_index,
                                    num_q_heads=hq, eps=eps)
    counters = got[3]
    want = attention_sublayer_reference(*args, jnp.int32(end), num_q_heads=hq, eps=eps)
    assert int(counters[layer_index, TIMED_OUT]) == 0
    for name, g, w in zip(("h", "k_cache", "v_cache"), got, want):
      assert relative_error(g, w) < _TOL[dtype], name
