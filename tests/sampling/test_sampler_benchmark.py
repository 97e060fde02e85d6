"""benchmarks/sampler.py on a tiny model (CPU, XLA decode step)."""

import jax
import pytest

from kat_jax.model import get_preset, init_params
from kat_jax.testing import benchmark_module


@pytest.fixture(scope="module")
def bench():
  return benchmark_module("sampler")


def test_bench_ours_times_the_decode_call_alone(bench):
  """The main table's time per token is the decode call's median over the repeats (no
  prefill in it); the generate - prefill estimate is recorded beside it."""
  config = get_preset("tiny", num_layers=1)
  params = init_params(config, jax.random.key(0))
  rows, meta = bench.bench_ours(config, params, [1, 2], prompt_len=8, new_tokens=3, repeats=2,
                                kernels="xla")
  assert meta["kernels"] == "xla"
  for b, row in rows.items():
    assert len(row["decode_s"]) == 2 and min(row["decode_s"]) > 0
    assert row["time_per_token_ms"] > 0
    assert abs(row["decode_tokens_per_s"] - b / (row["time_per_token_ms"] / 1e3)) < 1e-6
    assert "generate_minus_prefill_ms_per_token" in row
