"""benchmarks/tree_vs_unrolled.py end to end at `--tiny` size on CPU, and the token ratio of
its `--high-sharing` workload (issue 25 asks for >= 5)."""

from kat_jax.rl.tree import build_trees
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.testing import benchmark_module


def _bench():
  return benchmark_module("tree_vs_unrolled")


def test_high_sharing_workload_has_token_ratio_at_least_5():
  bench = _bench()
  shape = {k: v for k, v in bench.HIGH_SHARING.items() if k != "groups"}
  groups = bench.synthetic_groups(1, shape.pop("branch1"), shape.pop("branch2"),
                                  shape.pop("prompt"), shape.pop("turn"), shape.pop("tool"),
                                  vocab=256, extra_turns=shape.pop("extra_turns"))
  unrolled = sum(len(t.tokens) for t in groups[0])
  tree = build_trees(groups, ObjectiveConfig())[0].num_nodes
  assert unrolled / tree >= 5.0


def test_tiny_run_times_both_layouts(tmp_path):
  out = tmp_path / "tiny.json"
  report = _bench().main(["--tiny", "--out", str(out)])
  results = report["results"]["auto"]
  assert out.exists()
  for layout in ("tree", "unrolled"):
    assert results[layout]["step_s"] > 0
  assert results["token_ratio"] > 1.0  # the tree holds each shared prefix once
