"""Tree attention kernel vs the plain-JAX reference (interpret mode on CPU; compiled on GPU).

Interpret mode fills every kernel output buffer with NaN before the kernel runs, so the
finite-everywhere checks below also prove that every output element was written.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels import attention_reference
from kat_jax.kernels import causal_kv_end
from kat_jax.kernels import tile_classes
from kat_jax.kernels import tree_attention
from kat_jax.kernels import visibility_mask
from kat_jax.kernels.checks import kernel_and_reference
from kat_jax.testing import packed_kv_end, random_tree_kv_end, relative_error
from kat_jax.testing import subtree_ends_before_tile_end_kv_end

# The module (the package exports its function under the same name).
tree_attention_module = importlib.import_module("kat_jax.kernels.tree_attention")

_HAS_GPU = jax.default_backend() == "gpu"


def _inputs(seed, batch, length, num_q_heads, num_kv_heads, head_dim, dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, length, num_q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim), dtype)
  v = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim), dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  return q, k, v, d_out


def _check_against_reference(q, k, v, d_out, kv_end, tol, **kwargs):
  """Output and dq/dk/dv of the kernel vs the reference (f32, highest matmul precision)."""
  pairs = kernel_and_reference(q, k, v, d_out, kv_end, **kwargs)
  out = pairs["out"][0]
  assert out.shape == q.shape and out.dtype == q.dtype
  for name, (got, want) in pairs.items():
    assert got.shape == want.shape, name
    assert bool(jnp.all(jnp.isfinite(got))), f"{name} has non-finite (unwritten) entries"
    err = relative_error(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def test_random_tree_kv_end_is_well_formed():
  rng = np.random.default_rng(0)
  for length in (40, 97):
    kv_end = random_tree_kv_end(rng, length)
    assert np.all(kv_end > np.arange(length)) and np.all(kv_end <= length)


def test_tile_classes_match_the_dense_mask():
  rng = np.random.default_rng(1)
  length, bq, bk = 96, 16, 32
  kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length), packed_kv_end([30, 50, 16]),
                                 np.full(length, length, np.int32)]))
  classes = np.asarray(tile_classes(kv_end, bq, bk))
  mask = np.asarray(visibility_mask(kv_end))
  tiles = mask.reshape(3, length // bq, bq, length // bk, bk).transpose(0, 1, 3, 2, 4)
  all_visible = tiles.all(axis=(-1, -2))
  any_visible = tiles.any(axis=(-1, -2))
  np.testing.assert_array_equal(classes == 0, all_visible)  # full <=> every pair visible
  assert not np.any(any_visible[classes == 2])  # hidden tiles hold no visible pair
  assert np.any(classes == 2) and np.any(classes == 1) and np.any(classes == 0)


def test_random_trees_f32_gqa_d64():
  rng = np.random.default_rng(2)
  length = 70  # not a multiple of the blocks
  kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length),
                                 random_tree_kv_end(rng, length)]))
  q, k, v, d_out = _inputs(0, 2, length, 4, 2, 64, jnp.float32)
  _check_against_reference(q, k, v, d_out, kv_end, 1e-4, block_q=16, block_k=32,
                           interpret=True, backend="gpu")


def test_random_tree_bf16_d128():
  rng = np.random.default_rng(3)
  length = 45
  kv_end = jnp.asarray(random_tree_kv_end(rng, length)[None])
  q, k, v, d_out = _inputs(1, 1, length, 2, 2, 128, jnp.bfloat16)
  _check_against_reference(q, k, v, d_out, kv_end, 1e-2, block_q=16, block_k=16,
                           interpret=True, backend="gpu")


def test_packed_documents_and_causal_f32():
  length = 64
  kv_end = jnp.stack([jnp.asarray(packed_kv_end([9, 23, 17, 15])),
                      causal_kv_end(1, length)[0]])
  q, k, v, d_out = _inputs(2, 2, length, 2, 1, 64, jnp.float32)
  _check_against_reference(q, k, v, d_out, kv_end, 1e-4, block_q=32, block_k=16,
                           interpret=True, backend="gpu")


def test_subtree_ending_one_before_tile_end_is_masked():
  """A tile whose last query is one past a subtree's end (`kv_end = qe - 1` for keys in the
  tile) is partial; classing it full would let that query see the finished subtree
  (`kmin >= qe - 1` in `tile_classes` fails this: class 0, row error 0.5)."""
  block_q, block_k = 16, 32
  kv_end_np, row = subtree_ends_before_tile_end_kv_end(block_q, block_k)
  kv_end = jnp.asarray(kv_end_np[None])
  classes = np.asarray(tile_classes(kv_end, block_q, block_k))
  assert classes[0, row // block_q, 0] == 1  # partial
  q, k, v, d_out = _inputs(6, 1, kv_end.shape[1], 2, 1, 64, jnp.float32)
  pairs = kernel_and_reference(q, k, v, d_out, kv_end, block_q=block_q, block_k=block_k,
                               interpret=True, backend="gpu")
  got, want = pairs["out"]
  assert relative_error(got[:, row], want[:, row]) < 1e-4  # the boundary row itself
  for name, (got, want) in pairs.items():
    assert relative_error(got, want) < 1e-4, name


def test_rows_that_see_nothing_give_zeros():
  # kv_end[j] = j hides a token even from itself: rows with no visible key return 0, no NaN.
  length = 32
  kv_end_np = packed_kv_end([10, 22])
  kv_end_np[:5] = np.arange(5)
  kv_end = jnp.asarray(kv_end_np[None])
  q, k, v, d_out = _inputs(3, 1, length, 2, 2, 64, jnp.float32)
  out = tree_attention(q, k, v, kv_end, block_q=16, block_k=16, interpret=True, backend="gpu")
  assert bool(jnp.all(out[:, :5] == 0.0))
  assert relative_error(out, attention_reference(q, k, v, kv_end)) < 1e-4
  grads = jax.grad(lambda q, k, v: jnp.sum(tree_attention(
      q, k, v, kv_end, block_q=16, block_k=16, interpret=True, backend="gpu") * d_out),
                   argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_tpu_backend_interpret_random_tree():
  """Mosaic-TPU kernels (scalar-prefetched visit lists) in TPU interpret mode."""
  rng = np.random.default_rng(4)
  length = 40
  kv_end = jnp.asarray(random_tree_kv_end(rng, length)[None])
  q, k, v, d_out = _inputs(4, 1, length, 2, 1, 64, jnp.float32)
  _check_against_reference(q, k, v, d_out, kv_end, 1e-4, block_q=16, block_k=16,
                           interpret=True, backend="tpu")


@pytest.mark.parametrize("bad, match", [
    (dict(kv_end=jnp.zeros((1, 5), jnp.int32)), "kv_end"),
    (dict(kv_end=jnp.zeros((1, 8), jnp.float32)), "integer"),
    (dict(k=jnp.zeros((1, 8, 3, 64))), "multiple"),
    (dict(block_q=24), "power of two"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_input_raises(bad, match):
  args = dict(q=jnp.zeros((1, 8, 4, 64)), k=jnp.zeros((1, 8, 2, 64)), v=jnp.zeros((1, 8, 2, 64)),
              kv_end=jnp.full((1, 8), 8, jnp.int32))
  kwargs = dict(interpret=True)
  for key, value in bad.items():
    (args if key in args else kwargs)[key] = value
  if "k" in bad:
    args["v"] = bad["k"]
  with pytest.raises(ValueError, match=match):
    tree_attention(args["q"], args["k"], args["v"], args["kv_end"], **kwargs)


@pytest.mark.skipif(not _HAS_GPU, reason="needs a GPU (compiled Triton kernels; run with "
                    "KAT_TEST_GPU=1); CPU counterparts above run the same kernels interpreted")
@pytest.mark.parametrize("dtype, tol, head_dim", [(jnp.bfloat16, 1e-2, 128),
                                                   (jnp.float32, 1e-4, 64)])
def test_gpu_compiled_random_tree(dtype, tol, head_dim):
  rng = np.random.default_rng(5)
  length = 1000
  kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length, 200),
                                 packed_kv_end([300, 500, 200])]))
  q, k, v, d_out = _inputs(5, 2, length, 8, 4, head_dim, dtype)
  _check_against_reference(q, k, v, d_out, kv_end, tol, backend="gpu")


@pytest.mark.parametrize("dtype, head_dim, num_kv_heads", [(jnp.bfloat16, 128, 2),
                                                           (jnp.float32, 64, 4)])
def test_gpu_kernels_lower_to_triton_on_cpu(dtype, head_dim, num_kv_heads):
  """Forward, dQ and dK/dV kernels (GPU backend, not interpreted) lower to Triton IR: the
  Pallas -> Triton step runs here without a GPU (PTX compilation does not)."""
  from jax import export  # pylint: disable=g-import-not-at-top
  spec = lambda shape, t=dtype: jax.ShapeDtypeStruct(shape, t)
  q_shape, kv_shape = (1, 1000, 4, head_dim), (1, 1000, num_kv_heads, head_dim)

  def fwd_bwd(q, k, v, kv_end, d_out):
    out, vjp = jax.vjp(lambda q, k, v: tree_attention(q, k, v, kv_end, backend="gpu"), q, k, v)
    return out, vjp(d_out)

  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=[triton])(
      spec(q_shape), spec(kv_shape), spec(kv_shape), spec((1, 1000), jnp.int32), spec(q_shape))
  assert exported.mlir_module().count("xla.gpu.triton") == 3  # forward, dQ, dK/dV


class _FakeDevice:
  def __init__(self, platform, compute_capability=""):
    self.platform, self.compute_capability = platform, compute_capability


@pytest.mark.parametrize("platform, capability, dtype, head_dim, want", [
    ("gpu", "9.0", jnp.bfloat16, 128, "mgpu"),   # an H100 / H200
    ("gpu", "9.0", jnp.float16, 64, "mgpu"),
    ("gpu", "9.0", jnp.float32, 128, "gpu"),     # the Mosaic GPU kernel is bf16/f16 only
    ("gpu", "9.0", jnp.bfloat16, 32, "gpu"),     # head dims must tile 64
    ("gpu", "8.0", jnp.bfloat16, 128, "gpu"),    # an A100: no wgmma
    ("gpu", "10.0", jnp.bfloat16, 128, "gpu"),   # Blackwell: tcgen05, not wgmma
    ("tpu", "", jnp.bfloat16, 128, "tpu"),
])
def test_auto_backend_is_mosaic_gpu_only_for_hopper_and_the_inputs_it_takes(
    monkeypatch, platform, capability, dtype, head_dim, want):
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(platform, capability)])
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  assert tree_attention_module.default_backend(dtype, head_dim) == want


@pytest.mark.parametrize("tiles, want", [({}, "mgpu"), ({"block_q": 64, "block_k": 64}, "gpu")])
def test_auto_on_hopper_keeps_caller_tiles_on_the_triton_kernel(monkeypatch, tiles, want):
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice("gpu", "9.0")])
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  seen = []
  monkeypatch.setattr(tree_attention_module, "_tree_attention",
                      lambda q, k, v, kv_end, cfg: seen.append(cfg.backend) or q)
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  tree_attention(q, q, q, causal_kv_end(1, 64), **tiles)
  assert seen == [want]
