"""Tree attention on Mosaic GPU (backend 'mgpu') vs the plain-JAX reference.

On CPU: the kernels lower for CUDA (the Python half of Mosaic GPU's compilation: register
layouts, wgmma and TMA shapes, shared-memory scratch) and run in Mosaic GPU's CPU
interpreter (TMA copies, barriers and the visit-list schedule run; the interpreter takes plain
dots for wgmma).  On a Hopper GPU (`KAT_TEST_GPU=1`): the compiled kernels.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels import causal_kv_end
from kat_jax.kernels import KernelTiles
from kat_jax.kernels import tree_attention
from kat_jax.kernels.checks import kernel_and_reference
from kat_jax.kernels.reference import attention_reference
from kat_jax.kernels.mgpu_support import has_interpreter
from kat_jax.kernels.tree_attention_mgpu import DEFAULT_TUNING as DEFAULT_TUNING_MGPU
from kat_jax.kernels.tree_attention_mgpu import dkdv_smem_bytes
from kat_jax.kernels.tree_attention_mgpu import SMEM_BYTES
from kat_jax.testing import packed_kv_end
from kat_jax.testing import random_tree_kv_end
from kat_jax.testing import relative_error
from kat_jax.testing import subtree_ends_before_tile_end_kv_end

_ON_HOPPER = (jax.default_backend() == "gpu"
              and getattr(jax.devices()[0], "compute_capability", "") == "9.0")
_NEEDS_HOPPER = "compiled Mosaic GPU needs a Hopper GPU (run with KAT_TEST_GPU=1 on one)"


def _inputs(seed, batch, length, num_q_heads, num_kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, num_q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim), dtype)
  return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


def _rows(length: int, seed: int) -> jnp.ndarray:
  """[4, length] kv_end: a random forest, packed documents, causal, the tile-boundary tree
  (its subtree ends one query before a 64-row query block ends; tiled to `length`)."""
  rng = np.random.default_rng(seed)
  boundary, _ = subtree_ends_before_tile_end_kv_end(64, 128)
  repeats = -(-length // boundary.size)
  tiled = np.concatenate([boundary + i * boundary.size for i in range(repeats)])[:length]
  docs = [length // 3, length // 2, length - length // 3 - length // 2]
  return jnp.asarray(np.stack([random_tree_kv_end(rng, length, max(12, length // 6)),
                               packed_kv_end(docs), np.asarray(causal_kv_end(1, length)[0]),
                               np.minimum(tiled, length)]))


def _check(q, k, v, d_out, kv_end, tol, **kwargs):
  pairs = kernel_and_reference(q, k, v, d_out, kv_end, backend="mgpu", **kwargs)
  assert pairs["out"][0].dtype == q.dtype
  for name, (got, want) in pairs.items():
    assert bool(jnp.all(jnp.isfinite(got))), f"{name} has non-finite entries"
    err = relative_error(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


_SLOW = pytest.mark.skipif(
    not os.environ.get("KAT_TEST_SLOW"), reason="slow (~15 s a case): the interpreter runs 3 "
    "warpgroups one by one; one such case runs by default; run with KAT_TEST_SLOW=1")


_FWD_ONE_WARPGROUP = DEFAULT_TUNING_MGPU._replace(fwd=KernelTiles(64, 128, None, 2))
# Backward variants (dq tiles, dkdv tiles) beside the default 64x64 / 64x64, 2 stages:
# wider partner tiles on one warpgroup; 128-row blocks = two consumer warpgroups + a producer.
_BWD_VARIANTS = {
    "wide_partner_tiles": (KernelTiles(64, 128, None, 2), KernelTiles(128, 64, None, 2)),
    "three_stages": (KernelTiles(64, 64, None, 3), KernelTiles(64, 64, None, 3)),
    "warp_specialized": (KernelTiles(128, 64, None, 2), KernelTiles(64, 128, None, 2)),
    "warp_specialized_3_stages": (KernelTiles(128, 64, None, 3), KernelTiles(64, 128, None, 3)),
    "warp_specialized_wide": (KernelTiles(128, 128, None, 2), KernelTiles(128, 128, None, 2)),
    "warp_specialized_dq_ping_pong": (KernelTiles(128, 64, None, 2, True),
                                      KernelTiles(64, 64, None, 2)),
}


def _bwd_variant(name: str, fwd: KernelTiles = KernelTiles(64, 128, None, 2)):
  dq, dkdv = _BWD_VARIANTS[name]
  return DEFAULT_TUNING_MGPU._replace(fwd=fwd, dq=dq, dkdv=dkdv)


def _lowers_for_cuda(head_dim: int, num_kv_heads: int, tuning) -> str:
  """The exported fwd+bwd module (MLIR text) at the anchor workload's shape: 23,552 tokens, 32
  query heads."""
  length = 23552
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  q_shape, kv_shape = (1, length, 32, head_dim), (1, length, num_kv_heads, head_dim)

  def fwd_bwd(q, k, v, kv_end, d_out):
    out, vjp = jax.vjp(lambda q, k, v: tree_attention(q, k, v, kv_end, backend="mgpu",
                                                      tuning=tuning), q, k, v)
    return out, vjp(d_out)

  exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"])(
      spec(q_shape), spec(kv_shape), spec(kv_shape), spec((1, length), jnp.int32),
      spec(q_shape))
  return exported.mlir_module()


_KERNEL_NAMES = ("tree_attention_fwd_mgpu", "tree_attention_dq_mgpu", "tree_attention_dkdv_mgpu")


@pytest.mark.parametrize("head_dim, num_kv_heads, fwd_block_q, ping_pong", [
    (64, 32, 64, False), (128, 32, 64, False), (128, 8, 64, False), (128, 8, 128, False),
    (128, 32, 128, True), (64, 8, 128, True)])
def test_mgpu_fwd_and_bwd_lower_for_cuda_at_the_anchor_shape(head_dim, num_kv_heads,
                                                             fwd_block_q, ping_pong):
  """GQA 4:1 too; fwd_block_q 128 is the warp-specialised forward (two consumer warpgroups +
  a producer), with or without the consumers' ping-pong schedule barrier."""
  tuning = DEFAULT_TUNING_MGPU._replace(
      fwd=KernelTiles(fwd_block_q, 128, None, 2, ping_pong))
  module = _lowers_for_cuda(head_dim, num_kv_heads, tuning)
  for name in _KERNEL_NAMES:
    assert name in module, name


@pytest.mark.parametrize("variant", sorted(_BWD_VARIANTS))
@pytest.mark.parametrize("head_dim, num_kv_heads", [(64, 32), (128, 8)])
def test_mgpu_backward_variants_lower_for_cuda_at_the_anchor_shape(variant, head_dim,
                                                                  num_kv_heads):
  module = _lowers_for_cuda(head_dim, num_kv_heads,
                            _bwd_variant(variant, DEFAULT_TUNING_MGPU.fwd))
  for name in _KERNEL_NAMES:
    assert name in module, name


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
def test_mgpu_interpreted_matches_reference_on_tile_boundary_rows():
  rows = _rows(256, 0)[3:]  # the tile-boundary tree
  q, k, v, d_out = _inputs(0, 1, 256, 2, 1, 64, jnp.bfloat16)
  _check(q, k, v, d_out, rows, 1e-2, interpret=True, tuning=_FWD_ONE_WARPGROUP)


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
@pytest.mark.parametrize("variant, length, head_dim", [
    ("wide_partner_tiles", 200, 128), ("three_stages", 200, 64)])
def test_mgpu_interpreted_one_warpgroup_backward_variants_match_reference(
    variant, length, head_dim):
  """One warpgroup per kernel: dQ over 128-key tiles and dK/dV over 128-query tiles, or 3
  stages; T = 200 is padded to 256, GQA 2:1."""
  rows = _rows(length, 0)[3:]
  q, k, v, d_out = _inputs(0, 1, length, 2, 1, head_dim, jnp.bfloat16)
  _check(q, k, v, d_out, rows, 1e-2, interpret=True, tuning=_bwd_variant(variant))


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
@pytest.mark.parametrize("block_k, ping_pong", [pytest.param(128, False, marks=_SLOW),
                                                (64, True)])
def test_mgpu_warp_specialized_forward_interpreted_matches_reference(block_k, ping_pong):
  """Two consumer warpgroups and a producer; with 64-key tiles the producer refills slots."""
  kv_end_np, row = subtree_ends_before_tile_end_kv_end(64, 128)
  kv_end = jnp.asarray(kv_end_np[None])
  q, k, v, _ = _inputs(3, 1, kv_end.shape[1], 2, 1, 64, jnp.bfloat16)
  tuning = DEFAULT_TUNING_MGPU._replace(fwd=KernelTiles(128, block_k, None, 2, ping_pong))
  got = jax.jit(lambda q, k, v: tree_attention(q, k, v, kv_end, backend="mgpu", tuning=tuning,
                                               interpret=True))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  want = attention_reference(f32(q), f32(k), f32(v), kv_end)
  assert relative_error(got, want) < 1e-2
  assert relative_error(got[:, row], want[:, row]) < 1e-2


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
@pytest.mark.parametrize("variant, head_dim", [
    ("warp_specialized", 64), pytest.param("warp_specialized_3_stages", 128, marks=_SLOW),
    pytest.param("warp_specialized_wide", 64, marks=_SLOW),
    pytest.param("warp_specialized_dq_ping_pong", 128, marks=_SLOW)])
def test_mgpu_warp_specialized_backward_interpreted_matches_reference_on_tile_boundary_rows(
    variant, head_dim):
  """dQ over 128-row query blocks, dK/dV over 128-row key blocks (two consumer warpgroups and
  a producer each, the producer refilling ring slots); T = 200 padded to 256, GQA 2:1."""
  rows = _rows(200, 0)[3:]
  q, k, v, d_out = _inputs(4, 1, 200, 2, 1, head_dim, jnp.bfloat16)
  _check(q, k, v, d_out, rows, 1e-2, interpret=True, tuning=_bwd_variant(variant))


def test_mgpu_rejects_float32_odd_tiles_and_misplaced_ping_pong():
  q = jnp.zeros((1, 64, 2, 64), jnp.float32)
  kv_end = jnp.full((1, 64), 64, jnp.int32)
  with pytest.raises(ValueError, match="bf16 or f16"):
    tree_attention(q, q, q, kv_end, backend="mgpu")
  q = q.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match="fwd.block_q = 64 .* or 128"):
    tree_attention(q, q, q, kv_end, backend="mgpu", block_q=32, block_k=128)
  with pytest.raises(ValueError, match="dkdv.block_k = 64 .* or 128"):
    tree_attention(q, q, q, kv_end, backend="mgpu",
                   tuning=DEFAULT_TUNING_MGPU._replace(dkdv=KernelTiles(64, 256, None, 2)))
  with pytest.raises(ValueError, match="dq.block_k a multiple of 64"):
    tree_attention(q, q, q, kv_end, backend="mgpu",
                   tuning=DEFAULT_TUNING_MGPU._replace(dq=KernelTiles(64, 32, None, 2)))
  with pytest.raises(ValueError, match="fwd.block_q = 128 .* for fwd.ping_pong"):
    tree_attention(q, q, q, kv_end, backend="mgpu", tuning=DEFAULT_TUNING_MGPU._replace(
        fwd=KernelTiles(64, 128, None, 2, True)))
  with pytest.raises(ValueError, match="ping_pong for the forward and dQ only"):
    tree_attention(q, q, q, kv_end, backend="mgpu", tuning=DEFAULT_TUNING_MGPU._replace(
        dkdv=KernelTiles(64, 128, None, 2, True)))
  with pytest.raises(ValueError, match="fwd.ping_pong needs backend 'mgpu'"):
    tree_attention(q, q, q, kv_end, backend="gpu", tuning=DEFAULT_TUNING_MGPU._replace(
        fwd=KernelTiles(128, 128, None, 2, True)))


@pytest.mark.skipif(not _ON_HOPPER, reason=_NEEDS_HOPPER)
@pytest.mark.parametrize("dtype, head_dim, num_kv_heads", [
    (jnp.bfloat16, 128, 8), (jnp.bfloat16, 64, 2), (jnp.float16, 128, 2), (jnp.float16, 64, 8)])
@pytest.mark.parametrize("fwd_block_q, ping_pong", [(64, False), (128, False), (128, True)])
def test_mgpu_compiled_matches_reference(dtype, head_dim, num_kv_heads, fwd_block_q, ping_pong):
  """Forest, packed documents, causal and tile-boundary rows; T = 1000 (padded); both
  forward kernels (64: one warpgroup; 128: warp-specialised, with or without ping-pong)."""
  length = 1000
  q, k, v, d_out = _inputs(1, 4, length, 8, num_kv_heads, head_dim, dtype)
  tuning = DEFAULT_TUNING_MGPU._replace(
      fwd=KernelTiles(fwd_block_q, 128, None, 2, ping_pong))
  _check(q, k, v, d_out, _rows(length, 1), 1e-2, tuning=tuning)


@pytest.mark.skipif(not _ON_HOPPER, reason=_NEEDS_HOPPER)
@pytest.mark.parametrize("dtype, head_dim, num_kv_heads", [
    (jnp.bfloat16, 128, 8), (jnp.float16, 64, 2)])
@pytest.mark.parametrize("variant", [  # the 3-stage ones differ only in ring depth
    "warp_specialized", "warp_specialized_wide", "wide_partner_tiles",
    "warp_specialized_dq_ping_pong"])
def test_mgpu_compiled_backward_variants_match_reference(variant, dtype, head_dim,
                                                         num_kv_heads):
  """Forest, packed documents, causal and tile-boundary rows; T = 1000 (padded)."""
  q, k, v, d_out = _inputs(1, 4, 1000, 8, num_kv_heads, head_dim, dtype)
  _check(q, k, v, d_out, _rows(1000, 1), 1e-2,
         tuning=_bwd_variant(variant, DEFAULT_TUNING_MGPU.fwd))


@pytest.mark.skipif(not _ON_HOPPER, reason=_NEEDS_HOPPER)
def test_mgpu_compiled_tile_boundary_row_is_exact_at_the_boundary_query():
  kv_end_np, row = subtree_ends_before_tile_end_kv_end(64, 128)
  kv_end = jnp.asarray(kv_end_np[None])
  q, k, v, d_out = _inputs(2, 1, kv_end.shape[1], 4, 2, 128, jnp.bfloat16)
  got, want = kernel_and_reference(q, k, v, d_out, kv_end, backend="mgpu")["out"]
  assert relative_error(got[:, row], want[:, row]) < 1e-2


def test_mgpu_rejects_dkdv_tiles_over_shared_memory():
  q = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
  kv_end = jnp.full((1, 64), 64, jnp.int32)
  wide = KernelTiles(128, 128, None, 2)  # 128 key rows over 128-query tiles
  # 3 stages at D = 128: 267,264 B of dK/dV scratch; 2 stages fit (199,680 B).
  with pytest.raises(ValueError, match="lower dkdv.num_stages or dkdv.block_q"):
    tree_attention(q, q, q, kv_end, backend="mgpu", tuning=DEFAULT_TUNING_MGPU._replace(
        dkdv=wide._replace(num_stages=3)))
  assert dkdv_smem_bytes(wide, 128, 2) == 199_680 <= SMEM_BYTES


def test_model_attention_backend_tree_mgpu_dispatches_to_the_mosaic_gpu_kernel():
  from kat_jax.model.attention import attend  # pylint: disable=g-import-not-at-top
  from kat_jax.model.presets import get_preset  # pylint: disable=g-import-not-at-top
  assert get_preset("tiny", attention_backend="tree_mgpu").attention_backend == "tree_mgpu"
  spec = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  kv_spec = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda q, k, v: attend(q, k, v, None, backend="tree_mgpu")),
      platforms=["cuda"])(spec, kv_spec, kv_spec)
  assert "tree_attention_fwd_mgpu" in exported.mlir_module()
