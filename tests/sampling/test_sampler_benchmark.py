"""benchmarks/sampler.py's in-process A/B harness on a tiny model (CPU, XLA decode step)."""

import importlib.util
import os

import jax
import pytest

from kat_jax.model import get_preset, init_params
from kat_jax.sampling import logits as logits_lib
from kat_jax.sampling import sampler as sampler_lib

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "sampler.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("sampler_benchmark", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compare_in_process_variants(bench):
  """Every variant is timed; a patched function is traced into its variant and restored after;
  a variant's compiler options reach its Sampler."""
  config = get_preset("tiny", num_layers=1)
  params = init_params(config, jax.random.key(0))
  calls = []

  def counting(logits, rng, sampling):
    calls.append(logits.shape)
    return original(logits, rng, sampling)

  original = sampler_lib.sample_with_stats
  variants = {"base": {"kernels": "xla"},
              "patched": {"kernels": "xla", "compiler_options": {},
                          "patches": {(sampler_lib, "sample_with_stats"): counting}}}
  out = bench.compare_in_process(config, params, [1], prompt_len=8, new_tokens=4, repeats=2,
                                 variants=variants)
  rows = out[1]
  assert set(rows) == {"base", "patched"}
  assert sampler_lib.sample_with_stats is original is logits_lib.sample_with_stats
  assert calls  # traced with the patch
  for row in rows.values():
    assert len(row["decode_ms"]) == 2 and row["min_time_per_token_ms"] > 0
    assert row["min_time_per_token_ms"] <= row["time_per_token_ms"]
    assert row["same_tokens_as_base"]  # the patch computes the same values
  assert rows["base"]["vs_base"] == 1.0
  assert rows["patched"]["patched"] == ["kat_jax.sampling.sampler.sample_with_stats"]
  assert rows["patched"]["compiler_options"] == {}


def test_compare_against_a_baseline_package(bench, tmp_path, monkeypatch):
  """benchmarks/baseline_package.py copies kat_jax at a revision under another name; a variant
  naming that package runs its own Sampler (with its own DecodeParams) beside this one's."""
  spec = importlib.util.spec_from_file_location(
      "baseline_package", os.path.join(os.path.dirname(_PATH), "baseline_package.py"))
  baseline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(baseline)
  root = os.path.join(os.path.dirname(_PATH), "..")
  monkeypatch.chdir(root)  # git archive reads this repository
  package_dir = baseline.write_baseline("HEAD", str(tmp_path), name="kat_jax_ab_test")
  assert os.path.isfile(os.path.join(package_dir, "sampling", "sampler.py"))
  with pytest.raises(ValueError, match="no-such-revision"):
    baseline.write_baseline("no-such-revision", str(tmp_path))
  monkeypatch.syspath_prepend(str(tmp_path))
  config = get_preset("tiny", num_layers=1)
  params = init_params(config, jax.random.key(0))
  variants = {"this": {"kernels": "xla"},
              "base": {"kernels": "xla", "package": "kat_jax_ab_test"}}
  rows = bench.compare_in_process(config, params, [2], prompt_len=8, new_tokens=3, repeats=1,
                                  variants=variants)[2]
  assert rows["base"]["package"] == "kat_jax_ab_test"
  assert len(rows["base"]["package_revision"]) == 40 and rows["this"]["package_revision"] is None
  assert rows["base"]["same_tokens_as_this"]  # HEAD's code, the same greedy tokens
  import kat_jax_ab_test.sampling.sampler as base_sampler  # pylint: disable=import-outside-toplevel
  assert base_sampler.Sampler.__module__ == "kat_jax_ab_test.sampling.sampler"


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
