"""Paged decode attention: each backend vs `paged_decode_attention_reference`, and the
reference vs a per-row NumPy loop.

Every case covers the tiling boundaries: rows of length 0, 1, exactly a page multiple, one past
a page boundary, a partly filled last page, the whole table; a page shared by two rows; garbage
page-table entries past each row's pages (out of range, negative, or pointing at pool pages
filled with NaN, so reading one would show). Slots past a row's length in its last page hold
NaN for backends that promise to ignore them (xla, pallas_tpu) and large finite values for
mosaic_gpu (its MMA multiplies them by a zero weight, so they must be finite).
The TPU-style kernel and the Mosaic GPU kernel run in their CPU interpreters here; the
compiled Mosaic GPU kernel runs on a Hopper GPU (`KAT_TEST_GPU=1`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.kernels.paged_attention import (default_backend, paged_decode_attention,
                                             paged_decode_attention_reference)
from kat_jax.kernels.mgpu_support import has_interpreter
from kat_jax.kernels.paged_attention_mgpu import paged_decode_attention_mgpu
from kat_jax.kernels.paged_attention_tpu import paged_decode_attention_tpu

_ON_HOPPER = (jax.default_backend() == "gpu"
              and getattr(jax.devices()[0], "compute_capability", "") == "9.0")
_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _boundary_lengths(page_size: int, max_pages: int) -> list[int]:
  """One row per boundary case; rows 1 and 2 have at least one full page (shared)."""
  full = max_pages * page_size
  return [0, 2 * page_size + 1, 3 * page_size - 3, 1, 2 * page_size, full,
          min(4 * page_size, full), min(4 * page_size + 1, full - 1)]


def _case(seed: int, *, groups: int, head_dim: int, page_size: int, dtype, num_kv_heads: int = 2,
          max_pages: int = 12, dead_slot_value: float = float("nan")):
  """Random q, page pool, page table and lengths with every boundary case of the module doc."""
  lengths = np.array(_boundary_lengths(page_size, max_pages), np.int32)
  batch = len(lengths)
  used = -(-lengths // page_size)
  num_pages = int(used.sum()) + 4  # 4 pool pages no live table entry points at
  rng = np.random.default_rng(seed)
  order = rng.permutation(num_pages)
  table = rng.integers(-3 * num_pages, 3 * num_pages, (batch, max_pages)).astype(np.int32)
  unused = set(range(num_pages))
  offset = 0
  for b in range(batch):
    table[b, :used[b]] = order[offset:offset + used[b]]
    offset += used[b]
  table[2, 0] = table[1, 0]  # a shared prefix page (full in both rows)
  live_pages = {int(table[b, j]) for b in range(batch) for j in range(used[b])}
  unused -= live_pages
  # Garbage entries past the rows' pages: some point at the NaN-filled unused pages.
  for b in range(batch):
    if used[b] < max_pages:
      table[b, used[b]] = sorted(unused)[b % len(unused)]

  q = rng.standard_normal((batch, num_kv_heads * groups, head_dim), np.float32)
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  k = rng.standard_normal(shape, np.float32)
  v = rng.standard_normal(shape, np.float32)
  for page in unused:
    k[:, page], v[:, page] = np.nan, np.nan
  for b in range(batch):  # slots past the length in the row's last page
    fill = lengths[b] % page_size
    if fill:
      k[:, table[b, used[b] - 1], fill:] = dead_slot_value
      v[:, table[b, used[b] - 1], fill:] = dead_slot_value * 10
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table),
          jnp.asarray(lengths))


def _row_loop_reference(q, k_pages, v_pages, table, lengths) -> np.ndarray:
  """Float64 NumPy, one row and head at a time, reading only each row's live keys."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  out = np.zeros_like(q)
  for b in range(batch):
    length = int(lengths[b])
    for head in range(num_q_heads):
      h = head // (num_q_heads // num_kv_heads)
      if not length:
        continue
      pages = [int(table[b, t // page_size]) for t in range(length)]
      keys = np.stack([k_pages[h, p, t % page_size] for t, p in enumerate(pages)])
      values = np.stack([v_pages[h, p, t % page_size] for t, p in enumerate(pages)])
      scores = keys @ q[b, head] / np.sqrt(head_dim)
      weights = np.exp(scores - scores.max())
      out[b, head] = weights @ values / weights.sum()
  return out


def _assert_rows_close(got, want, lengths, tol: float) -> None:
  """Per row: finite, max |got - want| <= tol * max |want|; rows of length 0 exactly zero."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  for b, length in enumerate(np.asarray(lengths)):
    if length == 0:
      assert np.all(got[b] == 0), f"row {b} (length 0) is not zero"
      continue
    err = np.max(np.abs(got[b] - want[b]))
    assert np.isfinite(err) and err <= tol * np.max(np.abs(want[b])), (
        f"row {b} (length {length}): max error {err}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_per_row_numpy_loop(dtype):
  q, k, v, table, lengths = _case(0, groups=2, head_dim=64, page_size=8, dtype=dtype)
  got = jax.jit(paged_decode_attention_reference)(q, k, v, table, lengths)
  assert got.dtype == dtype
  _assert_rows_close(got, _row_loop_reference(q, k, v, table, lengths), lengths, _TOL[dtype])


# (groups, kv heads, head_dim, page_size, dtype, pages_per_block); pages_per_block 3 does not
# divide the 12-page table, so the last block runs past it.
_TPU_CASES = [(1, 2, 64, 8, jnp.float32, 1), (2, 2, 128, 16, jnp.bfloat16, 3),
              (7, 1, 64, 8, jnp.bfloat16, 4), (7, 1, 128, 16, jnp.float32, 3)]


@pytest.mark.parametrize("groups,num_kv_heads,head_dim,page_size,dtype,pages_per_block",
                         _TPU_CASES)
def test_pallas_tpu_interpreted_matches_reference(groups, num_kv_heads, head_dim, page_size,
                                                  dtype, pages_per_block):
  q, k, v, table, lengths = _case(1, groups=groups, head_dim=head_dim, page_size=page_size,
                                  dtype=dtype, num_kv_heads=num_kv_heads)
  kernel = jax.jit(lambda *a: paged_decode_attention_tpu(
      *a, pages_per_block=pages_per_block, interpret=True))
  got = kernel(q, k, v, table, lengths)
  assert got.dtype == dtype
  want = paged_decode_attention_reference(q, k, v, table, lengths)
  _assert_rows_close(got, want, lengths, _TOL[dtype])


def test_pallas_tpu_kernel_lowers_to_mosaic_tpu():
  q, k, v, table, lengths = _case(2, groups=7, head_dim=128, page_size=16, dtype=jnp.bfloat16,
                                  num_kv_heads=4)
  exported = jax.export.export(jax.jit(paged_decode_attention_tpu), platforms=["tpu"])(
      q, k, v, table, lengths)
  assert "tpu_custom_call" in exported.mlir_module()


# (groups, kv heads, head_dim, page_size, block_tokens, split_tokens, stages)
_MGPU_CASES = [(1, 1, 64, 16, 64, 192, 2),  # 4 pages per block; 3 blocks per split reuse a stage
               (2, 2, 128, 32, 64, 128, 2),  # 2 pages per block, 2 blocks per split
               (7, 1, 128, 64, 64, 64, 3)]  # one page per block and per split; spare stages


def _mgpu_check(case, interpret: bool) -> None:
  groups, num_kv_heads, head_dim, page_size, block_tokens, split_tokens, stages = case
  q, k, v, table, lengths = _case(3, groups=groups, head_dim=head_dim, page_size=page_size,
                                  dtype=jnp.bfloat16, num_kv_heads=num_kv_heads,
                                  max_pages=192 // page_size + 1, dead_slot_value=30.0)
  kernel = jax.jit(lambda *a: paged_decode_attention_mgpu(
      *a, block_tokens=block_tokens, split_tokens=split_tokens, stages=stages,
      interpret=interpret))
  got = kernel(q, k, v, table, lengths)
  assert got.dtype == jnp.bfloat16
  want = paged_decode_attention_reference(q, k, v, table, lengths)
  _assert_rows_close(got, want, lengths, _TOL[jnp.bfloat16])


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
@pytest.mark.parametrize("case", _MGPU_CASES)
def test_mosaic_gpu_interpreted_matches_reference(case):
  _mgpu_check(case, interpret=True)


@pytest.mark.skipif(not has_interpreter(), reason="this jax has no Mosaic GPU interpreter "
                    "(jax._src.pallas.mosaic_gpu.interpret)")
def test_mosaic_gpu_rows_taken_out_of_a_batch_keep_their_results_under_its_tiling_batch():
  # The engine's compacted decode call runs a few rows of a 128-row batch: with the wide
  # batch's tiling_batch their splits, and so their rounding, are the wide call's, bit for
  # bit; left to their own batch they would get another split (checked below).
  from kat_jax.kernels.paged_attention_mgpu import default_tiling  # pylint: disable=g-import-not-at-top
  q, k, v, table, lengths = _case(6, groups=2, head_dim=64, page_size=16, dtype=jnp.bfloat16,
                                  max_pages=28, dead_slot_value=30.0)
  rows = jnp.asarray([1, 5, 6])  # 5: a row over the whole table (3 splits at 128 rows)
  assert default_tiling(3, 2, 28 * 16, 16) != default_tiling(128, 2, 28 * 16, 16)
  kernel = jax.jit(functools.partial(paged_decode_attention_mgpu, tiling_batch=128,
                                     interpret=True))
  whole = kernel(q, k, v, table, lengths)
  part = kernel(q[rows], k, v, table[rows], lengths[rows])
  np.testing.assert_array_equal(np.asarray(part, np.float32), np.asarray(whole[rows], np.float32))
  own = jax.jit(functools.partial(paged_decode_attention_mgpu, interpret=True))(
      q[rows], k, v, table[rows], lengths[rows])
  assert np.any(np.asarray(own) != np.asarray(part)), "the split did not change the rounding"


# Engine shapes: (Hq, Hkv, D, page_size, tiling keywords) of qwen2.5-1.5b and -7b heads.
_LOWERING_CASES = [(12, 2, 128, 16, {}), (28, 4, 128, 64, dict(block_tokens=128, stages=3)),
                   (8, 8, 64, 32, dict(stages=4))]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,page_size,tiling", _LOWERING_CASES)
def test_mosaic_gpu_kernel_lowers_for_cuda(num_q_heads, num_kv_heads, head_dim, page_size,
                                           tiling):
  # The Python half of Mosaic GPU's compilation (register layouts, wgmma and TMA shapes,
  # shared-memory budget) runs here; PTX generation needs the GPU.
  batch, max_pages = 16, 8192 // page_size
  spec = jax.ShapeDtypeStruct
  args = (spec((batch, num_q_heads, head_dim), jnp.bfloat16),
          spec((num_kv_heads, batch * max_pages, page_size, head_dim), jnp.bfloat16),
          spec((num_kv_heads, batch * max_pages, page_size, head_dim), jnp.bfloat16),
          spec((batch, max_pages), jnp.int32), spec((batch,), jnp.int32))
  kernel = jax.jit(lambda *a: paged_decode_attention_mgpu(*a, **tiling))
  exported = jax.export.export(kernel, platforms=["cuda"])(*args)
  assert "mosaic_gpu" in exported.mlir_module()


@pytest.mark.skipif(not _ON_HOPPER, reason="compiled Mosaic GPU needs a Hopper GPU "
                    "(run with KAT_TEST_GPU=1 on one)")
@pytest.mark.parametrize("case", _MGPU_CASES)
def test_mosaic_gpu_compiled_matches_reference(case):
  _mgpu_check(case, interpret=False)


@pytest.mark.skipif(not _ON_HOPPER, reason="compiled Mosaic GPU needs a Hopper GPU "
                    "(run with KAT_TEST_GPU=1 on one)")
def test_mosaic_gpu_backend_on_hopper_matches_reference_at_engine_shapes():
  # qwen2.5-1.5b's heads, default tiling: several splits of several blocks per row.
  q, k, v, table, lengths = _case(4, groups=6, head_dim=128, page_size=16, dtype=jnp.bfloat16,
                                  max_pages=70, dead_slot_value=30.0)
  got = jax.jit(lambda *a: paged_decode_attention(*a, backend="mosaic_gpu"))(
      q, k, v, table, lengths)
  want = paged_decode_attention_reference(q, k, v, table, lengths)
  _assert_rows_close(got, want, lengths, _TOL[jnp.bfloat16])


def test_mosaic_gpu_rejects_float32_and_names_the_dtypes():
  q, k, v, table, lengths = _case(5, groups=2, head_dim=64, page_size=16, dtype=jnp.float32)
  with pytest.raises(ValueError, match="bf16 or all f16.*float32"):
    paged_decode_attention_mgpu(q, k, v, table, lengths, interpret=True)


def test_bad_shapes_raise_an_error_naming_the_argument():
  q, k, v, table, lengths = _case(6, groups=2, head_dim=64, page_size=8, dtype=jnp.float32)
  with pytest.raises(ValueError, match="lengths must be"):
    paged_decode_attention(q, k, v, table, lengths[:-1])
  with pytest.raises(ValueError, match="v_pages"):
    paged_decode_attention(q, k, v[:, :-1], table, lengths)
  with pytest.raises(ValueError, match="backend must be one of"):
    paged_decode_attention(q, k, v, table, lengths, backend="triton")


class _FakeDevice:
  def __init__(self, platform, compute_capability=""):
    self.platform, self.compute_capability = platform, compute_capability


@pytest.mark.parametrize("platform, capability, dtype, groups, head_dim, page_size, want", [
    ("gpu", "9.0", jnp.bfloat16, 6, 128, 16, "mosaic_gpu"),    # qwen2.5-1.5b on an H100
    ("gpu", "9.0", jnp.float16, 7, 128, 64, "mosaic_gpu"),     # qwen2.5-7b, one-block pages
    ("gpu", "9.0", jnp.float32, 6, 128, 16, "xla"),            # the kernel is bf16/f16 only
    ("gpu", "9.0", jnp.bfloat16, 6, 96, 16, "xla"),            # D not a multiple of 64
    ("gpu", "9.0", jnp.bfloat16, 6, 128, 24, "xla"),           # pages that do not tile 64 keys
    ("gpu", "9.0", jnp.bfloat16, 72, 128, 16, "xla"),          # more query heads than MMA rows
    ("gpu", "8.0", jnp.bfloat16, 6, 128, 16, "xla"),           # an A100: no Mosaic GPU
    ("tpu", "", jnp.bfloat16, 6, 128, 16, "pallas_tpu"),
    ("cpu", "", jnp.bfloat16, 6, 128, 16, "xla"),
])
def test_auto_backend_is_the_mosaic_gpu_kernel_only_for_hopper_inputs_it_takes(
    monkeypatch, platform, capability, dtype, groups, head_dim, page_size, want):
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(platform, capability)])
  assert default_backend(dtype, groups, head_dim, page_size) == want
