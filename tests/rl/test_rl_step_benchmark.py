"""benchmarks/rl_step.py on CPU at tiny size: both workloads, k = 0 and 1, do exactly the drawn
work (with the engine's tail compaction on), and the one-step-stale run trains its second batch
one version behind."""

import numpy as np

from kat_jax.testing import benchmark_module


def test_tiny_rl_step_generates_the_drawn_lengths_and_bounds_staleness(tmp_path):
  bench = benchmark_module("rl_step")
  # Compaction on (a call with <= 2 of the 8 slots busy runs 2 rows), the engine's programs
  # compiled up front.
  report = bench.main(["--tiny", "--compact_widths", "2", "--precompile", "2",
                       "--out", str(tmp_path / "rl_step.json")])
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
                      "compact_widths": [2]}


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


def test_the_fit_check_counts_the_update_scratch_twice_at_k1_and_falls_back_to_remat_full():
  bench = benchmark_module("rl_step")
  params, kv_gib, limit = 10**7, 0.25, 2**30
  temps = {"dots_no_batch": 300 * 2**20, "full": 50 * 2**20}
  static = params * 22 + 2**28
  assert bench.step_bytes(params, kv_gib, temps["full"], 0) == static + 50 * 2**20
  assert bench.step_bytes(params, kv_gib, temps["full"], 1) == static + 2 * 50 * 2**20
  assert bench.step_bytes(params, kv_gib, temps["full"], 3) == static + 2 * 50 * 2**20
  measured = []

  def update_temp(policy):
    measured.append(policy)
    return temps[policy]

  # k = 0: 0.20 + 0.25 + 0.29 = 0.75 GiB fits 1 GiB; k = 1: 0.20 + 0.25 + 2 x 0.29 > 1 GiB.
  assert bench.choose_remat("x k=0", "dots_no_batch", 0, params, kv_gib, limit,
                            update_temp) == ("dots_no_batch", "", {"dots_no_batch": temps[
                                "dots_no_batch"]})
  remat, line, seen = bench.choose_remat("x k=1", "dots_no_batch", 1, params, kv_gib, limit,
                                         update_temp)
  assert (remat, seen) == ("full", temps)
  assert line == ("x k=1 uses remat full: remat dots_no_batch: 0.2 GiB static (0.01B "
                  "parameters x 22 bytes) + 0.25 GiB KV + 2 x 0.29 GiB update scratch = 1.04 "
                  "GiB > 1.00 GiB usable; remat full: 0.2 GiB static (0.01B parameters x 22 "
                  "bytes) + 0.25 GiB KV + 2 x 0.05 GiB update scratch = 0.55 GiB fits")
  # Not even remat full fits half a GiB: does not fit, with both policies' arithmetic.
  remat, line, _ = bench.choose_remat("x k=1", "dots_no_batch", 1, params, kv_gib, 2**29,
                                      update_temp)
  assert remat is None and line.startswith("x k=1 does not fit: remat dots_no_batch: ")
  assert "; remat full: " in line and line.endswith(
      "= 0.55 GiB > 0.50 GiB usable (k >= 1: a second scratch span for the rollout beside the "
      "update)")
  # A backend without memory analysis: the requested policy, said to be unchecked.
  assert bench.choose_remat("x", "dots_no_batch", 1, params, kv_gib, limit, lambda _: None) == (
      "dots_no_batch", "x: the backend reports no memory analysis, the update's scratch is not "
      "checked", {})
  # Unknown device memory (CPU): the requested policy, nothing compiled.
  measured.clear()
  assert bench.choose_remat("x", "dots_no_batch", 1, params, kv_gib, None,
                            update_temp) == ("dots_no_batch", "", {})
  assert not measured


def test_rl_step_k1_reports_does_not_fit_with_the_update_scratch_before_rolling_out(capsys):
  """The tiny tree step on a device with room for the static bytes only: k = 1 measures the
  update's scratch under the requested remat and "full", and stops with the arithmetic
  before the engine allocates its pool."""
  bench = benchmark_module("rl_step")
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  args = bench._parse(["--tiny", "--steps", "0"])  # pylint: disable=protected-access
  clock = benchmark_module("rollout").CompileClock(__import__("jax"))
  static = bench.static_bytes(get_preset("tiny", num_layers=1).num_params(), args.kv_gib)
  result = bench.run(args, 1, "tree", clock, static + 1)
  temps = result["update_temp_bytes"]
  assert result["status"] == "does_not_fit" and "steps" not in result
  assert set(temps) == {"none", "full"} and min(temps.values()) > 0
  printed = capsys.readouterr().out
  assert printed.startswith("error: benchmarks/rl_step.py: tiny tree k=1 (rows of 1024 tokens) "
                            "does not fit: remat none: ")
  assert printed.rstrip().endswith("(k >= 1: a second scratch span for the rollout beside "
                                   "the update)") and "tree k=1 step" not in printed


def test_the_planned_row_length_is_the_largest_tree_of_the_draw_measured_on_the_h100():
  """tree_sizes, known before sampling, against the tree tokens of the H100 runs' batches: an
  upper bound, exact but for the grpo batch, where two samples drew the same first token."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  bench = benchmark_module("rl_step")
  args = bench._parse([])  # pylint: disable=protected-access
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  prompts, lengths = benchmark_module("rollout").workload(
      args, get_preset("qwen2.5-1.5b").vocab_size)
  folder = os.path.join(os.path.dirname(bench.__file__), "results")
  for name in ("grpo", "tree"):
    with open(os.path.join(folder, f"rl_step_qwen2.5-1.5b_{name}_h100.json"),
              encoding="utf-8") as f:
      step = json.load(f)["results"][0]["steps"][0]
    sizes = bench.tree_sizes(args, name, prompts, lengths)
    assert int(sizes.sum()) - step["tree_tokens"] == (1 if name == "grpo" else 0)
    assert -(-int(sizes.max()) // 1024) * 1024 == step["seq_len"]


def _tree_trajectories(bench, args, engine, config, prompts, lengths, barrier: bool):
  """The tree workload's recorded trajectories (tokens, loss mask, log-probs) on `engine`."""
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.trajectories import TrajectoryManager  # pylint: disable=g-import-not-at-top
  args.workload_now, args.turn_barrier = "tree", barrier
  producer = bench.Producer(args, config, engine, None, None, prompts, lengths, 0)
  manager = TrajectoryManager()
  groups = [manager.new_group() for _ in prompts]
  scored = []
  producer.generate(jax.random.key(5), bench.rollout_sampling(), manager, groups,
                    lambda iid, tokens: scored.append(iid))
  out = [sorted(((t.tokens.tolist(), t.loss_mask.tolist(), t.logprobs) for t in
                 manager.trajectories(g)), key=lambda t: t[:2]) for g in groups]
  assert sum(map(len, out)) == len(scored) == args.prompts * args.samples
  return out


def test_tree_second_turns_sample_the_same_tokens_with_or_without_the_turn_barrier():
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.model import get_preset, init_params  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import Engine, prepare_params  # pylint: disable=g-import-not-at-top
  bench = benchmark_module("rl_step")
  args = bench._parse(["--tiny"])  # pylint: disable=protected-access
  config = get_preset("tiny", num_layers=1, dtype="float32")
  dparams = prepare_params(init_params(config, jax.random.key(0)), config)
  prompts, lengths = benchmark_module("rollout").workload(args, config.vocab_size)
  runs = []
  for barrier in (True, False):
    # Three slots for 8 first-turn samples: first turns queue, so without the barrier some
    # second turns start before other first turns do.
    engine = Engine(config, dparams, num_slots=3, num_pages=256, page_size=4,
                    prefill_chunk=16, steps_per_call=4)
    runs.append(_tree_trajectories(bench, args, engine, config, prompts, lengths, barrier))
  for barrier_group, streamed_group in zip(*runs):
    assert len(barrier_group) == len(streamed_group) == args.samples
    for (tokens_a, mask_a, logp_a), (tokens_b, mask_b, logp_b) in zip(barrier_group,
                                                                      streamed_group):
      assert tokens_a == tokens_b and mask_a == mask_b
      np.testing.assert_allclose(logp_a, logp_b, rtol=1e-5, atol=1e-6)


def test_simulated_tree_rollout_takes_fewer_decode_steps_without_the_turn_barrier():
  bench = benchmark_module("rl_step")
  # 3 slots for the 8 first-turn samples of the tiny draw.
  report = bench.main(["--tiny", "--simulate", "--workload", "tree", "--num_slots", "3"])
  args = bench._parse(["--tiny"])  # pylint: disable=protected-access
  _, lengths = benchmark_module("rollout").workload(args, 1024)
  second = args.samples // args.branch1
  drawn = int(sum(sum(max(1, int(n) // 2) for n in row[::second][:args.branch1])
                  + sum(max(1, int(n) - int(n) // 2) for n in row) for row in lengths))
  runs = {r["turn_barrier"]: r for r in report["runs"]}
  assert runs[True]["generated_tokens"] == runs[False]["generated_tokens"] == drawn
  assert runs[False]["decode_steps"] < runs[True]["decode_steps"]
