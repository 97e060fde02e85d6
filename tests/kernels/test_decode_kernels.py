"""Fused decode kernels (`kat_jax.kernels.decode`) vs their plain-JAX references.

Interpret mode on CPU (it fills non-aliased outputs with NaN first, so the finite checks
also prove that every output element was written); the compiled Triton kernels on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels.decode import (MAX_BATCH, decode_attention, decode_attention_reference,
                                    fused_matvec, fused_path_supported, matvec_reference)
from kat_jax.model.layers import rope_cos_sin
from kat_jax.testing import relative_error

_HAS_GPU = jax.default_backend() == "gpu"
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _matvec_inputs(seed, batch, k_size, n_rows, dtype):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (batch, k_size), dtype)
  w = (jax.random.normal(keys[1], (n_rows, k_size)) / np.sqrt(k_size)).astype(dtype)
  scale = (1.0 + 0.2 * jax.random.normal(keys[2], (k_size,))).astype(dtype)
  bias = jax.random.normal(keys[3], (n_rows,), dtype)
  residual = jax.random.normal(keys[4], (batch, n_rows), dtype)
  return x, w, scale, bias, residual


_TILINGS = {"8_rows": {}, "4_rows_8_warps": dict(block_n=4, num_warps=8),
            "persistent_2_rows": dict(block_n=2, num_warps=4, programs=132),
            "persistent_2_rows_512_wide": dict(block_n=2, num_warps=4, programs=132,
                                               max_chunk=512),
            # 1024 divides neither K = 1536 nor 8960: the last chunk overlaps, masked.
            "persistent_1_row_1024_wide": dict(block_n=1, num_warps=4, programs=264,
                                               max_chunk=1024)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH])
@pytest.mark.parametrize("options", ["plain", "norm_bias", "residual", "norm_swiglu_residual"])
def test_matvec_matches_reference(dtype, batch, options):
  # K = 160: a 128-column chunk, then one over [32, 160) whose first 96 columns are masked.
  k_size, n_rows = 160, 64
  x, w, scale, bias, residual = _matvec_inputs(batch, batch, k_size, n_rows, dtype)
  kwargs = {"plain": {}, "norm_bias": dict(norm_scale=scale, bias=bias, eps=1e-5),
            "residual": dict(residual=residual),
            "norm_swiglu_residual": dict(norm_scale=scale, swiglu=True,
                                         residual=residual[:, :n_rows // 2])}[options]
  # Both row tiles the decode step uses: 8 rows with a norm prologue, 4 with a residual.
  tile = _TILINGS["8_rows" if "norm" in options else "4_rows_8_warps"]
  got = fused_matvec(x, w, interpret=True, **tile, **kwargs)
  want = matvec_reference(x, w, **kwargs)
  assert got.shape == want.shape and got.dtype == dtype
  assert bool(jnp.all(jnp.isfinite(got)))
  assert relative_error(got, want) < _TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_wider_load_chunks_compute_the_same_product(dtype):
  """max_chunk sets how many columns one load takes: of K = 640, 64 -> ten chunks; 512 -> two,
  the second over [128, 640) with its first 384 columns masked (the RMSNorm must not count
  them twice, nor the product)."""
  x, w, scale, _, residual = _matvec_inputs(11, 2, 640, 16, dtype)
  for kwargs in (dict(norm_scale=scale, swiglu=True), dict(residual=residual)):
    want = matvec_reference(x, w, **kwargs)
    for max_chunk in (64, 512):
      got = fused_matvec(x, w, block_n=4, max_chunk=max_chunk, interpret=True, **kwargs)
      assert relative_error(got, want) < _TOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("programs", [3, 5])
def test_persistent_matvec_equals_one_block_per_program(dtype, programs):
  """A persistent grid (each program loops over every `programs`-th block, loading the next
  block's weights before reducing the current one) computes what the block kernel does (the
  same sums in the same order; interpreted, XLA compiles the two bodies differently, so
  float32 may differ in the last bits); 5 programs leave the last step partial (6 blocks of
  the swiglu product, 12 of the others)."""
  batch, k_size, n_rows = 2, 96, 96
  x, w, scale, bias, residual = _matvec_inputs(7, batch, k_size, n_rows, dtype)
  for kwargs in (dict(norm_scale=scale, bias=bias), dict(residual=residual),
                 dict(norm_scale=scale, swiglu=True, residual=residual[:, :n_rows // 2])):
    blocks = fused_matvec(x, w, block_n=8, interpret=True, **kwargs)
    persistent = fused_matvec(x, w, block_n=8, programs=programs, interpret=True, **kwargs)
    assert relative_error(persistent, blocks) < 1e-6
    assert relative_error(persistent, matvec_reference(x, w, **kwargs)) < _TOL[dtype]
  with pytest.raises(ValueError, match="programs"):
    fused_matvec(x, w, block_n=8, programs=13, interpret=True)


def _attention_inputs(seed, batch, cache_len, hq, hkv, head_dim, dtype, end):
  keys = jax.random.split(jax.random.key(seed), 5)
  qkv = jax.random.normal(keys[0], (batch, (hq + 2 * hkv) * head_dim), dtype)
  k_cache = jax.random.normal(keys[1], (batch, cache_len, hkv, head_dim), dtype)
  v_cache = jax.random.normal(keys[2], (batch, cache_len, hkv, head_dim), dtype)
  valid = np.array(jax.random.bernoulli(keys[3], 0.7, (batch, cache_len)))
  valid[:, end + 1:] = False
  valid[:, end] = True
  valid[batch - 1, end] = False  # an inactive row: its new key is written but not visible
  # RoPE tables of 1000 positions, each row at a random one of them.
  positions = jax.random.randint(keys[4], (batch,), 0, 1000)
  cos, sin = rope_cos_sin(jnp.arange(1000)[None], head_dim, 10000.0, dtype)
  return qkv, cos[0, :, 0], sin[0, :, 0], positions, k_cache, v_cache, jnp.asarray(valid)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hq, hkv, end, cache_len, block_s", [
    (4, 4, 0, 50, 16),  # only the new token
    (6, 2, 37, 50, 16),  # cache_len not a multiple of the blocks
    (4, 1, 49, 50, 16),  # the last slot
    (2, 1, 290, 300, 8),  # 37 blocks: the merge runs over three chunks of 16
])
def test_decode_attention_matches_reference(dtype, hq, hkv, end, cache_len, block_s):
  batch, head_dim = 3, 32
  args = _attention_inputs(end, batch, cache_len, hq, hkv, head_dim, dtype, end)
  got = decode_attention(*args, jnp.int32(end), num_q_heads=hq, block_s=block_s,
                         interpret=True)
  _check_attention(got, decode_attention_reference(*args, jnp.int32(end), num_q_heads=hq),
                   dtype)


def _check_attention(got, want, dtype):
  """decode_attention's (out, k_cache, v_cache) vs the reference's; the last row is inactive."""
  for name, g, w in zip(("out", "k_cache", "v_cache"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert bool(jnp.all(jnp.isfinite(g))), name
  out_rows = slice(0, got[0].shape[0] - 1)  # the inactive row's output is not defined
  assert relative_error(got[0][out_rows], want[0][out_rows]) < _TOL[dtype]
  assert relative_error(got[1], want[1]) < _TOL[dtype]
  np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


def test_clear_errors():
  x, w, *_ = _matvec_inputs(0, MAX_BATCH + 1, 64, 32, jnp.float32)
  with pytest.raises(ValueError, match="rows"):
    fused_matvec(x, w, interpret=True)
  with pytest.raises(ValueError, match="block_n"):
    fused_matvec(x[:1], w[:24], block_n=16, interpret=True)
  with pytest.raises(ValueError, match="contract"):
    fused_matvec(x[:1], w[:, :32], interpret=True)
  with pytest.raises(ValueError, match="must be >= 16"):
    fused_matvec(x[:1, :8], w[:, :8], interpret=True)
  args = _attention_inputs(0, 2, 16, 4, 2, 32, jnp.float32, 3)
  with pytest.raises(ValueError, match="query heads"):
    decode_attention(*args, jnp.int32(3), num_q_heads=2, interpret=True)
  qkv, cos, sin, positions, *cache = args
  with pytest.raises(ValueError, match="tables"):
    decode_attention(qkv, cos[:5], sin, positions, *cache, jnp.int32(3), num_q_heads=4,
                     interpret=True)
  with pytest.raises(ValueError, match="positions"):
    decode_attention(qkv, cos, sin, positions[:, None], *cache, jnp.int32(3), num_q_heads=4,
                     interpret=True)
  assert fused_path_supported(1, 1536, 8960, 12, 2, 128)  # qwen2.5-1.5b
  assert not fused_path_supported(MAX_BATCH + 1, 1536, 8960, 12, 2, 128)


@pytest.mark.skipif(not _HAS_GPU, reason="needs a GPU (compiled Triton kernels; run with "
                    "KAT_TEST_GPU=1); the CPU tests above run the same kernels interpreted")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("tiling", list(_TILINGS))
def test_gpu_compiled_qwen_shapes(dtype, tiling):
  d, f, hq, hkv, head_dim = 1536, 8960, 12, 2, 128  # qwen2.5-1.5b
  tile = _TILINGS[tiling]
  x, w, scale, bias, residual = _matvec_inputs(0, 1, d, (hq + 2 * hkv) * head_dim, dtype)
  got = fused_matvec(x, w, norm_scale=scale, bias=bias, **tile)
  assert relative_error(got, matvec_reference(x, w, norm_scale=scale, bias=bias)) < _TOL[dtype]
  x, w, scale, _, residual = _matvec_inputs(1, 2, d, 2 * f, dtype)
  got = fused_matvec(x, w, norm_scale=scale, swiglu=True, **tile)
  assert relative_error(got, matvec_reference(x, w, norm_scale=scale, swiglu=True)) < _TOL[dtype]
  x, w, _, _, residual = _matvec_inputs(2, 1, f, d, dtype)
  got = fused_matvec(x, w, residual=residual, **tile)
  assert relative_error(got, matvec_reference(x, w, residual=residual)) < _TOL[dtype]
  end = 300
  args = _attention_inputs(3, MAX_BATCH, 512, hq, hkv, head_dim, dtype, end)
  want = decode_attention_reference(*args, jnp.int32(end), num_q_heads=hq)
  # every active row's output (MAX_BATCH - 1 of them) and both whole caches
  _check_attention(decode_attention(*args, jnp.int32(end), num_q_heads=hq), want, dtype)


def test_kernels_lower_to_triton_on_cpu():
  """The compiled (non-interpret) kernels lower to Triton IR at Qwen2.5-1.5B shapes: the
  Pallas -> Triton step runs here, without a GPU (PTX compilation does not)."""
  from jax import export  # pylint: disable=g-import-not-at-top
  dt, b, s, hq, hkv, hd, d, f = jnp.bfloat16, 1, 300, 12, 2, 128, 1536, 8960
  spec = lambda shape, t=dt: jax.ShapeDtypeStruct(shape, t)
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")

  def lower(fn, *args):
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(*args)
    assert "xla.gpu.triton" in exported.mlir_module()

  n_qkv = (hq + 2 * hkv) * hd
  lower(lambda x, w, sc, bias: fused_matvec(x, w, norm_scale=sc, bias=bias),
        spec((b, d)), spec((n_qkv, d)), spec((d,)), spec((n_qkv,)))
  lower(lambda x, w, sc: fused_matvec(x, w, norm_scale=sc, swiglu=True),
        spec((b, d)), spec((2 * f, d)), spec((d,)))
  lower(lambda x, w, r: fused_matvec(x, w, residual=r), spec((b, f)), spec((d, f)), spec((b, d)))
  lower(lambda x, w, r: fused_matvec(x, w, residual=r, block_n=1, programs=264, max_chunk=1024),
        spec((b, f)), spec((d, f)), spec((b, d)))  # masked last chunk: 8960 = 8.75 x 1024
  lower(lambda x, w, sc: fused_matvec(x, w, norm_scale=sc, swiglu=True, block_n=2, programs=396),
        spec((b, d)), spec((2 * f, d)), spec((d,)))
  lower(lambda *a: decode_attention(*a, num_q_heads=hq),
        spec((b, n_qkv)), spec((s, hd)), spec((s, hd)), spec((b,), jnp.int32),
        spec((b, s, hkv, hd)), spec((b, s, hkv, hd)), spec((b, s), jnp.bool_),
        spec((), jnp.int32))
