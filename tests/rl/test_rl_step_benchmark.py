"""benchmarks/rl_step.py on CPU at tiny size: both workloads, k = 0 and 1, do exactly the drawn
work (with the engine's tail compaction on), and the one-step-stale run trains its second batch
one version behind."""

import numpy as np

from kat_jax.testing import benchmark_module


def test_tiny_rl_step_generates_the_drawn_lengths_and_bounds_staleness(tmp_path):
  bench = benchmark_module("rl_step")
  # Compaction on (a call with <= 2 of the 8 slots busy runs 2 rows), command buffers asked
  # for (GPU only: no compiler option here), the engine's programs compiled up front.
  report = bench.main(["--tiny", "--compact_widths", "2", "--command_buffers",
                       "--precompile", "2", "--out", str(tmp_path / "rl_step.json")])
  assert (tmp_path / "rl_step.json").exists()
  args = bench._parse(["--tiny"])  # pylint: disable=protected-access
  _, lengths = benchmark_module("rollout").workload(args, 1024)
  second = args.samples // args.branch1
  halves = [sum(max(1, int(n) // 2) for n in row[::second][:args.branch1])
            + sum(max(1, int(n) - int(n) // 2) for n in row) for row in lengths]
  expected = {"grpo": int(lengths.sum()), "tree": int(sum(halves))}
  assert [(r["workload"], r["k"]) for r in report["results"]] == [
      ("grpo", 0), ("grpo", 1), ("tree", 0), ("tree", 1)]
  for result in report["results"]:
    steps = result["steps"]
    assert [s["generated_tokens"] for s in steps] == [expected[result["workload"]]] * len(steps)
    assert [s["staleness"] for s in steps] == ([0] * len(steps) if result["k"] == 0
                                               else [0] + [1] * (len(steps) - 1))
    assert all(s["tree_tokens"] < s["unrolled_tokens"] for s in steps)
    assert all((s["is_weight_mean"] is None) == (result["k"] == 0) for s in steps)
    assert np.isfinite(result["tokens_per_s_per_device"]) and result["tokens_per_s_per_device"] > 0
    engine = result["engine"]
    assert engine.pop("compact_calls") > 0 and engine.pop("precompile")["programs"] > 0
    assert engine == {"attention": "xla", "long_rows": 8, "num_slots": args.num_slots,
                      "compact_widths": [2], "command_buffers": True, "compiler_options": {}}


def test_rl_step_reports_does_not_fit_when_the_static_state_exceeds_device_memory(
    tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  bench = benchmark_module("rl_step")

  class OneGiBDevice:
    device_kind = "a 1 GiB device"

    def memory_stats(self):
      return {"bytes_limit": 2**30}

  monkeypatch.setattr(jax, "devices", lambda *a: [OneGiBDevice()])
  out = tmp_path / "rl_step.json"
  report = bench.main(["--tiny", "--kv_gib", "2", "--out", str(out)])
  assert report["status"] == "does_not_fit" and report["results"] == []
  assert "2 GiB KV" in report["error"] and "> 1.0 GiB usable on a 1 GiB device" in report["error"]
  assert (tmp_path / "rl_step.json").exists()
  # qwen2.5-7b's weights, AdamW moments and gradients alone exceed one H200's 141 GB.
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  assert bench.static_bytes(get_preset("qwen2.5-7b").num_params(), 0) > 141e9
