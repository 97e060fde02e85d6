"""The one-kernel decoder layer (`kat_jax.kernels.decode_layer`) vs its references.

Interpret mode on CPU (programs run one at a time in id order, so each phase's wait is already
met; the counters still prove every phase counted its programs); the compiled Triton kernel
on a GPU, where the phases really overlap.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels.decode import MAX_BATCH, decode_attention, fused_matvec
from kat_jax.kernels.decode_layer import (GATE_UP, HEAD_BLOCKS, LAYER_TILES, MERGED, O, QKV,
                                          TIMED_OUT, decode_layer, decode_layer_reference,
                                          layer_counters)
from kat_jax.model.layers import rope_cos_sin
from kat_jax.testing import relative_error

_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
_SMALL_TILES = dict(qkv=8, o=4, gate_up=8, down=2, block_s=16)


def _layer_inputs(seed, batch, hidden, intermediate, hq, hkv, head_dim, cache_len, end, dtype,
                  bias=True):
  keys = jax.random.split(jax.random.key(seed), 11)
  n_qkv = (hq + 2 * hkv) * head_dim

  def weight(key, shape):
    return (jax.random.normal(key, shape) / np.sqrt(shape[1])).astype(dtype)

  def norm(key, size):
    return (1.0 + 0.2 * jax.random.normal(key, (size,))).astype(dtype)

  layer = dict(input_norm=norm(keys[0], hidden), qkv=weight(keys[1], (n_qkv, hidden)),
               o=weight(keys[2], (hidden, hq * head_dim)),
               post_attn_norm=norm(keys[3], hidden),
               gate_up=weight(keys[4], (2 * intermediate, hidden)),
               down=weight(keys[5], (hidden, intermediate)))
  if bias:
    layer["qkv_bias"] = jax.random.normal(keys[6], (n_qkv,), dtype)
  h = jax.random.normal(keys[7], (batch, hidden), dtype)
  k_cache = jax.random.normal(keys[8], (batch, cache_len, hkv, head_dim), dtype)
  v_cache = jax.random.normal(keys[9], (batch, cache_len, hkv, head_dim), dtype)
  valid = np.array(jax.random.bernoulli(keys[10], 0.7, (batch, cache_len)))
  valid[:, end] = True  # the new token's slot
  cos, sin = rope_cos_sin(jnp.arange(batch, dtype=jnp.int32)[:, None] + end, head_dim, 1e4,
                          dtype)
  return h, layer, cos[:, 0, 0], sin[:, 0, 0], k_cache, v_cache, jnp.asarray(valid)


def _expected_counts(batch, n_qkv, hidden, intermediate, hq, used, tiles):
  counts = np.zeros(HEAD_BLOCKS + batch * hq, np.int32)
  counts[QKV] = n_qkv // tiles["qkv"]
  counts[MERGED] = batch * hq
  counts[O] = hidden // tiles["o"]
  counts[GATE_UP] = intermediate // tiles["gate_up"]
  counts[HEAD_BLOCKS:] = used
  return counts


# (batch, Hq, Hkv, bias, end, cache length): GQA 2 with a cache of 3 blocks; a new token at
# slot 0 (one block, only the new key) with 3 rows and no bias; 38 blocks, so the last block
# merges over three chunks of 16.
_CASES = [(1, 4, 2, True, 37, 40), (3, 6, 2, False, 0, 24), (2, 4, 4, True, 600, 608)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", _CASES)
def test_layer_matches_reference(dtype, case):
  batch, hq, hkv, bias, end, cache_len = case
  hidden, intermediate, head_dim = 64, 96, 32
  h, layer, cos, sin, k_cache, v_cache, valid = _layer_inputs(
      end, batch, hidden, intermediate, hq, hkv, head_dim, cache_len, end, dtype, bias)
  counters = layer_counters(3, batch, hq)
  got = decode_layer(h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(end), counters,
                     layer_index=1, num_q_heads=hq, eps=1e-6, tiles=_SMALL_TILES,
                     interpret=True)
  want = decode_layer_reference(h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(end),
                                num_q_heads=hq, eps=1e-6)
  for name, g, w in zip(("h", "k_cache", "v_cache"), got[:3], want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert relative_error(g, w) < _TOL[dtype], name
  used = max(-(-end // _SMALL_TILES["block_s"]), 1)
  n_qkv = layer["qkv"].shape[0]
  counts = np.asarray(got[3])
  np.testing.assert_array_equal(counts[1], _expected_counts(batch, n_qkv, hidden, intermediate,
                                                            hq, used, _SMALL_TILES))
  assert counts[1, TIMED_OUT] == 0 and not counts[[0, 2]].any()  # other layers' rows untouched


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_equals_the_six_kernel_step(dtype):
  """Same programs, same numbers: the layer kernel computes the per-product kernels' step."""
  batch, hq, hkv, end, cache_len = 2, 4, 2, 21, 48
  hidden, intermediate, head_dim = 64, 96, 32
  h, layer, cos, sin, k_cache, v_cache, valid = _layer_inputs(
      7, batch, hidden, intermediate, hq, hkv, head_dim, cache_len, end, dtype)
  tiles = _SMALL_TILES
  got = decode_layer(h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(end),
                     layer_counters(1, batch, hq), layer_index=0, num_q_heads=hq, eps=1e-6,
                     tiles=tiles, interpret=True)
  qkv = fused_matvec(h, layer["qkv"], norm_scale=layer["input_norm"], eps=1e-6,
                     bias=layer["qkv_bias"], block_n=tiles["qkv"], interpret=True)
  attn, k_want, v_want = decode_attention(qkv, cos, sin, k_cache, v_cache, valid, end,
                                          num_q_heads=hq, block_s=tiles["block_s"],
                                          interpret=True)
  mid = fused_matvec(attn, layer["o"], residual=h, block_n=tiles["o"], interpret=True)
  act = fused_matvec(mid, layer["gate_up"], norm_scale=layer["post_attn_norm"], eps=1e-6,
                     swiglu=True, block_n=tiles["gate_up"], interpret=True)
  h_want = fused_matvec(act, layer["down"], residual=mid, block_n=tiles["down"], interpret=True)
  for g, w in zip(got[:3], (h_want, k_want, v_want)):
    if dtype == jnp.bfloat16:  # every rounding to bf16 lands on the same value
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    else:  # XLA fuses the interpreted f32 programs differently: last-bit differences only
      assert relative_error(g, w) < 1e-6


def test_clear_errors():
  h, layer, cos, sin, k_cache, v_cache, valid = _layer_inputs(0, 1, 64, 96, 4, 2, 32, 24, 3,
                                                              jnp.float32)
  args = (h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(3))
  kw = dict(layer_index=0, num_q_heads=4, eps=1e-6, interpret=True)
  with pytest.raises(ValueError, match=r"tiles\['down'\] = 3"):
    decode_layer(*args, layer_counters(1, 1, 4), tiles=dict(down=3), **kw)
  with pytest.raises(ValueError, match="counters"):
    decode_layer(*args, layer_counters(1, 2, 4), **kw)
  with pytest.raises(ValueError, match="counters"):
    decode_layer(*args, layer_counters(1, 1, 4), **{**kw, "layer_index": 1})
  with pytest.raises(ValueError, match="rows"):
    decode_layer(jnp.zeros((MAX_BATCH + 1, 64)), *args[1:], layer_counters(1, 5, 4), **kw)
  with pytest.raises(ValueError, match="qkv"):
    decode_layer(*args, layer_counters(1, 1, 4), **{**kw, "num_q_heads": 2})


def _qwen_layer_shapes(batch, dtype, cache_len=256):
  """Qwen2.5-1.5B: d 1536, F 8960, 12 query heads and 2 KV heads of 128."""
  return dict(batch=batch, hidden=1536, intermediate=8960, hq=12, hkv=2, head_dim=128,
              cache_len=cache_len, dtype=dtype)


@pytest.mark.skipif(not (jax.default_backend() == "gpu" and os.environ.get("KAT_TEST_GPU")),
                    reason="needs a GPU (run with KAT_TEST_GPU=1); the CPU tests above run the "
                    "same programs interpreted")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_compiled_qwen_shapes(dtype, batch):
  """The compiled kernel at Qwen2.5-1.5B shapes, where the phases overlap: it matches the
  reference, counts every program and never times out, over three layers of counters."""
  shapes = _qwen_layer_shapes(batch, dtype)
  end = 200
  h, layer, cos, sin, k_cache, v_cache, valid = _layer_inputs(
      1, shapes["batch"], shapes["hidden"], shapes["intermediate"], shapes["hq"],
      shapes["hkv"], shapes["head_dim"], shapes["cache_len"], end, dtype)
  counters = layer_counters(3, batch, shapes["hq"])
  want = decode_layer_reference(h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(end),
                                num_q_heads=shapes["hq"], eps=1e-6)
  run = jax.jit(lambda *a, i: decode_layer(*a, layer_index=i, num_q_heads=shapes["hq"],
                                           eps=1e-6), static_argnames="i")
  for i in range(3):
    got = run(h, layer, cos, sin, k_cache, v_cache, valid, jnp.int32(end), counters, i=i)
    for g, w in zip(got[:3], want):
      assert relative_error(g, w) < _TOL[dtype]
    counters = got[3]
    assert int(counters[i, TIMED_OUT]) == 0
  used = -(-end // 16)
  np.testing.assert_array_equal(
      np.asarray(counters[2]),
      _expected_counts(batch, layer["qkv"].shape[0], shapes["hidden"], shapes["intermediate"],
                       shapes["hq"], used, LAYER_TILES))


def test_layer_lowers_to_triton_on_cpu():
  """The compiled (non-interpret) kernel lowers to Triton IR at Qwen2.5-1.5B shapes."""
  from jax import export  # pylint: disable=g-import-not-at-top

  s = _qwen_layer_shapes(1, jnp.bfloat16)
  spec = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)
  d, f, hq, hkv, hd = s["hidden"], s["intermediate"], s["hq"], s["hkv"], s["head_dim"]
  n_qkv = (hq + 2 * hkv) * hd
  layer = dict(input_norm=spec((d,)), qkv=spec((n_qkv, d)), qkv_bias=spec((n_qkv,)),
               o=spec((d, hq * hd)), post_attn_norm=spec((d,)), gate_up=spec((2 * f, d)),
               down=spec((d, f)))
  cache = spec((1, s["cache_len"], hkv, hd))
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  fn = lambda *a: decode_layer(*a, layer_index=0, num_q_heads=hq, eps=1e-6)
  exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
      spec((1, d)), layer, spec((1, hd)), spec((1, hd)), cache, cache,
      spec((1, s["cache_len"]), jnp.int32), spec((), jnp.int32),
      spec((28, HEAD_BLOCKS + hq), jnp.int32))
  assert "xla.gpu.triton" in exported.mlir_module()
