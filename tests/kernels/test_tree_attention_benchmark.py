"""benchmarks/tree_attention.py end to end at `--tiny` size on CPU (kernels interpreted), and its
tile strings."""

import json

import pytest

from kat_jax.kernels import KernelTiles
from kat_jax.testing import benchmark_module


def test_tiny_run_times_triton_and_tile_sweeps_and_marks_gpu_only_methods_skipped(tmp_path):
  bench = benchmark_module("tree_attention")
  record = bench.main(["--tiny", "--skip-checks", "--backends", "gpu", "--out", str(tmp_path),
                       "--name", "tiny.json", "--sweep-bwd", "64,64,4,2/64,64,4,2",
                       "32,64,4,2/64,32,4,2", "--sweep-fwd", "128,128,4,2", "64,32,4,2"])
  assert json.loads((tmp_path / "tiny.json").read_text()) == json.loads(json.dumps(record))
  assert record["completed"] == "all"  # the last of its incremental saves
  assert record["interpreted"] and record["workload"]["tokens"] == 224
  assert set(record["times_ms"]) == {"tree_gpu", "flop_floor"}
  assert record["times_ms"]["tree_gpu"]["fwd_bwd"] > 0
  assert set(record["skipped"]) == {"cudnn_unrolled", "flex_tree",
                                    "stock_attention_mgpu_unrolled"}
  rate = record["fwd_rates"]["tree_gpu"]
  assert rate["mfu_vs_peak"] == rate["tflops"] / 989.0
  first, second, first_fwd, second_fwd = record["sweep"]  # backward configs come first
  assert (second["dq"], second["dkdv"], second_fwd["fwd"]) == ("32,64,4,2", "64,32,4,2",
                                                               "64,32,4,2")
  assert first["fwd_bwd_ms"] > 0 and second["fwd_bwd_ms"] > 0 and second_fwd["fwd_ms"] > 0
  assert "vs_first_config" not in first and "vs_first_config" not in first_fwd
  assert second["vs_first_config"] < 1e-2 and second_fwd["vs_first_config"] < 1e-2
  assert second["bwd_ms"] == second["fwd_bwd_ms"] - record["times_ms"]["tree_gpu"]["fwd"]
  causal = record["causal_rows"]["128"]
  assert causal["tree_gpu"]["fwd"]["ms"] > 0 and "skipped" in causal["cudnn"]


def test_tile_strings_parse_the_ping_pong_flag_and_format_back_and_extra_fields_are_refused(
    capsys):
  bench = benchmark_module("tree_attention")
  for text, tiles in [("64,128,0,2", KernelTiles(64, 128, None, 2)),
                      ("128,128,0,2,1", KernelTiles(128, 128, None, 2, True))]:
    assert bench.parse_tiles(text) == tiles
    assert bench.format_tiles(tiles) == text
  with pytest.raises(SystemExit):
    bench.parse_args(["--sweep-bwd", "128,128,0,2/64,128,0,2,0,1"])
  assert "error: tiles '64,128,0,2,0,1': expected bq,bk,warps,stages[,ping_pong]" in (
      capsys.readouterr().err)
