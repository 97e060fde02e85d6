"""benchmarks/paged_attention.py at tiny size (CPU, kernels interpreted): every backend's
output matches the XLA reference, for ragged rows and for a batch's tail (one busy row)."""

import pytest

from kat_jax.testing import benchmark_module


@pytest.mark.parametrize("tail", [0, 1])
def test_paged_attention_benchmark_backends_match_xla_at_tiny_size(tail):
  module = benchmark_module("paged_attention")
  record = module.main(["--tiny", "--tail", str(tail)])
  (row,) = record["rows"]
  assert set(row["ms"]) == {"xla", "mosaic_gpu", "pallas_tpu"}
  for name in ("mosaic_gpu", "pallas_tpu"):
    assert row[f"{name}_max_abs_err_vs_xla"] < 2e-2, name  # bf16 outputs of O(1) values
  if tail:
    assert row["mean_len"] == 100 / 4  # one row at --max_len of the tiny run, three idle
