"""benchmarks/tree_vs_unrolled.py end to end at `--tiny` size on CPU, the token ratio of its
`--high-sharing` workload (issue 25 asks for >= 5), and its micro-batching: the same update
in micro-batches as in one batch, micro-batches chosen to fit a memory budget from the
compiled step's memory analysis, and the `error:` exit when nothing fits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kat_jax.model import get_preset, init_params
from kat_jax.parallel import sharding_context
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import make_policy_step
from kat_jax.rl.tree import build_trees
from kat_jax.testing import benchmark_module
from kat_jax.train.memory_fit import tree_bytes
from kat_jax.train.state import create_train_state


def _bench():
  return benchmark_module("tree_vs_unrolled")


def _tiny_unrolled(bench):
  """The `--tiny` workload's config, objective and unrolled batch [4 rows, 128]."""
  config = get_preset("tiny", num_layers=1)
  objective = ObjectiveConfig(eps_high=0.28)
  args = bench._parse(["--tiny"])  # pylint: disable=protected-access
  batch = bench.layouts(args, config, objective)["unrolled"]
  assert batch["tokens"].shape == (4, 128)
  return config, objective, batch


def test_high_sharing_workload_has_token_ratio_at_least_5():
  bench = _bench()
  shape = {k: v for k, v in bench.HIGH_SHARING.items() if k != "groups"}
  groups = bench.synthetic_groups(1, shape.pop("branch1"), shape.pop("branch2"),
                                  shape.pop("prompt"), shape.pop("turn"), shape.pop("tool"),
                                  vocab=256, extra_turns=shape.pop("extra_turns"))
  unrolled = sum(len(t.tokens) for t in groups[0])
  tree = build_trees(groups, ObjectiveConfig())[0].num_nodes
  assert unrolled / tree >= 5.0


def test_tiny_run_reports_each_layouts_micro_batching_and_the_speedup_over_token_ratio(
    tmp_path, capsys):
  out = tmp_path / "tiny.json"
  report = _bench().main(["--tiny", "--out", str(out)])
  results = report["results"]["auto"]
  assert json.loads(out.read_text())["results"]["auto"]["token_ratio"] == results["token_ratio"]
  for layout, rows in (("tree", 1), ("unrolled", 4)):
    r = results[layout]
    # CPU reports no memory limit: every row in one micro-batch, said in the note.
    assert (r["rows"], r["micro_batches"], r["rows_per_micro_batch"]) == (rows, 1, rows)
    assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_s"])
    assert "the device reports no memory limit" in r["plan"]
  assert results["token_ratio"] == results["unrolled"]["tokens"] / results["tree"]["tokens"] > 1
  assert results["speedup_over_token_ratio"] == pytest.approx(
      results["speedup"] / results["token_ratio"])
  printed = capsys.readouterr().out
  assert "speed-up / token ratio" in printed and "micro-b." in printed


def test_micro_batched_unrolled_update_gives_the_one_batch_loss_and_parameter_update():
  """The unrolled batch's update in 2 and 4 micro-batches against make_policy_step on all 4
  rows in one jitted call. Under SGD the parameter change is the summed gradient itself (an
  AdamW first step is ~lr * sign(g) and would hide, e.g., a gradient averaged instead of
  summed over micro-batches). Tolerances: the loss and gradient are the same f32 sums taken
  in another order (per micro-batch, then added), so the loss agrees to 1e-6 relative (~8
  f32 ulps); a parameter may differ by one ulp of itself (p - g rounded to f32 on either
  side) plus the reassociated gradient's error, bounded here by 1e-5 of the largest
  change in its leaf (measured: at most 4e-7 of it beyond the ulp)."""
  bench = _bench()
  config, objective, batch = _tiny_unrolled(bench)
  optimizer = optax.sgd(1.0)
  params = init_params(config, jax.random.key(0))
  one_batch = jax.jit(make_policy_step(config, optimizer, objective,
                                       loss_chunk=bench.LOSS_CHUNK))
  expected_state, expected = one_batch(create_train_state(params, optimizer), batch)
  update_for = bench.updates_of(config, optimizer, objective)
  for rows in (2, 1):
    state = create_train_state(jax.tree.map(jnp.copy, params), optimizer)  # donated
    state, metrics = update_for("none", rows)(state, batch)
    assert metrics["micro_batches"] == 4 // rows
    np.testing.assert_allclose(metrics["loss"], float(expected["loss"]), rtol=1e-6)
    for new, want, old in zip(jax.tree.leaves(state.params),
                              jax.tree.leaves(expected_state.params), jax.tree.leaves(params)):
      new, want, old = np.asarray(new), np.asarray(want), np.asarray(old)
      change = np.abs(want - old).max()
      assert change > 0  # every leaf trains on this batch
      bound = np.spacing(np.maximum(np.abs(new), np.abs(want))) + 1e-5 * change
      assert np.all(np.abs(new - want) <= bound), np.abs(new - want).max()


def test_micro_batch_options_go_from_fewest_micro_batches_to_remat_full():
  options = [option for _, option in _bench().micro_batch_options(6, "dots")]
  assert options == [("dots", 6), ("dots", 3), ("dots", 2), ("dots", 1),
                     ("full", 6), ("full", 3), ("full", 2), ("full", 1)]
  names = [name for name, _ in _bench().micro_batch_options(2, "full")]
  assert names == ["2 rows x 1 micro-batch, remat full", "1 row x 2 micro-batches, remat full"]


def _abstract_state(bench, config, optimizer):
  """The benchmark's unallocated train state and its bytes with one gradient beside it."""
  abstract = bench.abstract_state(config, optimizer, bench.one_device_mesh())
  return abstract, tree_bytes(abstract) + tree_bytes(abstract.params)


def test_chosen_micro_batch_is_the_first_option_whose_measured_step_fits_the_budget():
  """Scratch bytes from the compiled gradient passes' memory analysis (CPU reports it);
  for budgets at and just below each option's bytes, the plan takes the first option (in
  micro_batch_options order) that fits, and every option before it does not."""
  bench = _bench()
  config, objective, batch = _tiny_unrolled(bench)
  optimizer = optax.adamw(1e-4)
  update_for = bench.updates_of(config, optimizer, objective)
  with sharding_context(bench.one_device_mesh()):
    abstract, static = _abstract_state(bench, config, optimizer)
    # Room for the state and one gradient only: every option is measured, none fits.
    nothing = bench.plan_layout("u", batch, "none", static, abstract, update_for)
    assert nothing.choice is None and len(nothing.scratch) == 6
    assert nothing.line.startswith("u does not fit: 4 rows x 1 micro-batch, remat none: ")
    need = {option: bench.update_bytes(abstract, batch, option[1], temp)[0]
            for option, temp in nothing.scratch.items()}
    order = [option for _, option in bench.micro_batch_options(4, "none")]
    assert need[("none", 4)] > need[("none", 2)] > need[("none", 1)]  # the rows drive it
    for budget in sorted({b + d for b in need.values() for d in (-1, 0)}):
      fit = bench.plan_layout("u", batch, "none", budget, abstract, update_for)
      fits = [option for option in order if need[option] <= budget]
      assert fit.choice == (fits[0] if fits else None)
      if fit.choice is not None:
        assert need[fit.choice] <= budget
        assert all(need[o] > budget for o in order[:order.index(fit.choice)])
    # Below the state and one gradient: turned down before any compile.
    assert bench.plan_layout("u", batch, "none", static - 1, abstract,
                             lambda *_: pytest.fail("compiled")).line.endswith(
                                 "usable, before any activation")


def test_a_layout_that_fits_no_way_prints_an_error_and_exits_1_after_measuring_the_others(
    tmp_path, capsys):
  """A budget of exactly the unrolled rows' step in 1-row micro-batches, below the tree
  row's least step (checked first): the unrolled side runs in 4 micro-batches of 1 row, a
  note says why; the tree side fits under no remat policy: an error line with its
  arithmetic, and exit status 1 once the report is written."""
  bench = _bench()
  config, objective, batch = _tiny_unrolled(bench)
  args = bench._parse(["--tiny"])  # pylint: disable=protected-access
  tree_batch = bench.layouts(args, config, objective)["tree"]
  optimizer = optax.adamw(1e-4)
  update_for = bench.updates_of(config, optimizer, objective)
  with sharding_context(bench.one_device_mesh()):
    abstract, static = _abstract_state(bench, config, optimizer)
    one_row = update_for("none", 1).micro_batch_temp_bytes(abstract.params,
                                                           bench.layout_spec(batch, 1))
    budget = bench.update_bytes(abstract, batch, 1, one_row)[0]
    tree = bench.plan_layout("t", tree_batch, "none", static, abstract, update_for).scratch
  tree_least = min(bench.update_bytes(abstract, tree_batch, 1, t)[0] for t in tree.values())
  assert tree_least > budget  # the premise: CPU's dense attention over the 256-token tree row
  out = tmp_path / "tiny.json"
  with pytest.raises(SystemExit) as exit_info:
    bench.main(["--tiny", "--memory-limit-gib", repr(budget / 2**30), "--out", str(out)])
  assert exit_info.value.code == 1
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["status"] == "does_not_fit" and report["bytes_limit"] == budget
  unrolled, tree = report["results"]["auto"]["unrolled"], report["results"]["auto"]["tree"]
  assert (unrolled["micro_batches"], unrolled["rows_per_micro_batch"]) == (4, 1)
  assert unrolled["step_s"] > 0
  assert unrolled["plan"].startswith("note: benchmarks/tree_vs_unrolled.py: auto unrolled "
                                     "[4 x 128] uses 1 row x 4 micro-batches, remat none: ")
  assert tree["status"] == "does_not_fit" and "step_s" not in tree
  assert ("error: benchmarks/tree_vs_unrolled.py: auto tree [1 x 256] does not fit: 1 row x 1 "
          "micro-batch, remat none: ") in printed
  assert "; 1 row x 1 micro-batch, remat full: " in printed
  assert "Traceback" not in printed
