"""Trace summaries: busy time is a union of op intervals; categories partition the op time."""

import jax
import jax.numpy as jnp
import pytest

from kat_jax.train import profiling


def test_union_length_merges_overlaps():
  assert profiling._union_length([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


@pytest.mark.parametrize("name,category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("nvjet_hsh_128x256", "matmul"),
    ("tree_attention_fwd", "attention kernel"), ("all-reduce.3", "collective"),
    ("Memcpy HtoD", "copy"), ("loop_add_fusion", "other fusion")])
def test_op_category(name, category):
  assert profiling.op_category(name) == category


def test_summarize_cpu_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((128, 128))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(a).block_until_ready()
  summary = profiling.summarize_trace(profiling.find_trace_file(str(tmp_path)))
  assert summary["plane"] == "/host:CPU" and summary["events"] >= 3
  assert 0 < summary["busy_ms"] <= summary["span_ms"] + 1e-9
  assert 0 < summary["busy_fraction"] <= 1
  assert sum(c["share"] for c in summary["categories"].values()) == pytest.approx(1.0)
  assert summary["top_ops"][0]["ms"] >= summary["top_ops"][-1]["ms"]
  assert "busy" in profiling.format_summary(summary)


def test_missing_trace_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profiling.find_trace_file(str(tmp_path))
