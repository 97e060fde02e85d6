"""benchmarks/device_profile.py: per-step kernel figures from trace events."""

import pytest

from kat_jax.testing import benchmark_module


def _event(module, name, start_us, duration_us, line="Stream #7(Compute)"):
  return module.KernelEvent(line, name, start_us * 1e3, duration_us * 1e3)


def test_kernel_summary_splits_span_into_busy_and_gaps_per_step_and_sorts_kernels():
  module = benchmark_module("device_profile")
  events = [_event(module, "paged_decode_attention_mgpu", 0, 30),
            _event(module, "nvjet_hsh_128x64_gemm", 40, 50),
            _event(module, "loop_add_fusion", 100, 10),
            _event(module, "paged_decode_attention_mgpu", 120, 30),
            _event(module, "MemcpyH2D", 160, 40)]
  summary = module.kernel_summary(events, steps=2)
  # span 0..200 us = 0.2 ms over 2 steps; busy 160 us; gaps 40 us.
  assert summary["span_ms_per_step"] == pytest.approx(0.1)
  assert summary["busy_ms_per_step"] == pytest.approx(0.08)
  assert summary["gap_ms_per_step"] == pytest.approx(0.02)
  assert summary["kernels_per_step"] == 2.5
  assert summary["ms_per_step_by_kind"] == pytest.approx(
      {"attention": 0.03, "copy": 0.02, "matmul": 0.025, "other": 0.005})
  top = summary["top_kernels"][0]
  assert (top["name"], top["count_per_step"], top["ms_per_step"]) == (
      "paged_decode_attention_mgpu", 1.0, pytest.approx(0.03))


def test_kernel_summary_of_no_events_says_so_and_rejects_zero_steps():
  module = benchmark_module("device_profile")
  assert module.kernel_summary([], steps=3)["note"] == "no GPU kernel in the trace"
  with pytest.raises(ValueError, match="steps must be >= 1"):
    module.kernel_summary([], steps=0)


def test_kernel_events_reads_a_real_trace_and_finds_no_gpu_stream_on_cpu(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  module = benchmark_module("device_profile")
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  x = jnp.ones((32, 32))
  f(x).block_until_ready()
  with module.Window(str(tmp_path)):
    f(x).block_until_ready()
  assert module.kernel_events(str(tmp_path)) == []
  with pytest.raises(FileNotFoundError, match="no \\*.xplane.pb trace"):
    module.kernel_events(str(tmp_path / "empty"))
