"""The same policy update, tree-packed vs unrolled: time and tokens per step.

    python benchmarks/tree_vs_unrolled.py --out benchmarks/results/agentic_tree_vs_unrolled_cpu.json
    python benchmarks/tree_vs_unrolled.py --tiny          # CPU smoke run (a unit test runs it)
    python benchmarks/tree_vs_unrolled.py --high-sharing --preset qwen2.5-1.5b \
        --dtype bfloat16 --remat full --attention tree_mgpu --out $OUT/tree_vs_unrolled.json  # GPU

Rollouts are synthetic multi-turn trees with the shape of an agentic group: one prompt, a first
turn shared by `branch2` episodes, `branch1` first-turn branches, a tool output and a second
turn per episode, then `extra_turns` more (tool output, turn) pairs of its own (`--prompt`,
`--turn`, `--tool` set the segment lengths). `--high-sharing` is issue 25's workload: an 8K
shared prompt, 8 branches, 4 assistant turns with 3 tool outputs per episode (token ratio
5.3). Both layouts hold the same trajectories and give the same loss
(tests/agentic/test_tree_exactness.py); this measures the cost.

Each layout takes one optimizer update the way the trainer does (`rl.policy_step.
AccumulatedPolicyUpdate`, AdamW): gradients summed over micro-batches of its rows, then one
update; the same update whichever the micro-batch size. Before anything is allocated, each
layout's micro-batch size is chosen from its compiled gradient pass's memory analysis: the
most rows per micro-batch (a divisor of its rows, so no padding rows) whose step fits the
device (weights, AdamW moments, the running gradient sum and one micro-batch's gradient,
plus the pass's scratch), under `--remat`, else under remat "full"; a `note:` line says what
was chosen and why (`--memory-limit-gib` sets the budget where the device reports none, e.g.
CPU, or to try a smaller device). A layout that fits no way gets an `error:` line and the script exits 1
after measuring the others. Each layout is timed over `--repeats` updates after a warm-up
one (the compiles), for every `--attention` backend; the report gives per layout rows,
micro-batches, tokens, step seconds and tokens/s, and the tree's speed-up over unrolled
against the token ratio (issue 25's target: speed-up >= 0.85 x token ratio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from kat_jax.rl.tree import Trajectory, build_trees, pack_trees, unrolled_batch
from kat_jax.model import ModelConfig, get_preset
from kat_jax.train.memory_fit import Fit, device_bytes_limit, first_fit, gib, tree_bytes
from kat_jax.train.state import init_sharded_state, state_shardings
from kat_jax.parallel import make_mesh, sharding_context
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import POLICY_INPUTS, AccumulatedPolicyUpdate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import write_report  # noqa: E402  pylint: disable=g-import-not-at-top

SCRIPT = "benchmarks/tree_vs_unrolled.py"
TARGET = 0.85  # issue 25: the tree update >= 0.85 x its token ratio faster than unrolled
LOSS_CHUNK = 512


def synthetic_groups(num_groups: int, branch1: int, branch2: int, prompt: int, turn: int,
                     tool: int, vocab: int, seed: int = 0, extra_turns: int = 0
                     ) -> list[list[Trajectory]]:
  """Groups of branch1 x branch2 episodes sharing the prompt and first turns; each episode
  has 2 + extra_turns assistant turns, separated by tool outputs."""
  rng = np.random.default_rng(seed)
  groups = []
  for _ in range(num_groups):
    head = list(rng.integers(0, vocab, prompt))
    group = []
    for _ in range(branch1):
      first = list(rng.integers(0, vocab, turn))
      obs = list(rng.integers(0, vocab, tool))
      for _ in range(branch2):
        second = list(rng.integers(0, vocab, turn))
        tokens = head + first + obs + second
        mask = [0] * prompt + [1] * turn + [0] * tool + [1] * turn
        for _ in range(extra_turns):
          tokens += list(rng.integers(0, vocab, tool)) + list(rng.integers(0, vocab, turn))
          mask += [0] * tool + [1] * turn
        # the context determines the behaviour log-prob: shared prefix, shared value
        old, prefix_hash = [], 0
        for token in tokens:  # a running hash of the prefix: O(length), not O(length^2)
          prefix_hash = hash((prefix_hash, int(token)))
          old.append(-1.0 - (prefix_hash % 100) / 100)
        group.append(Trajectory(tokens, mask, float(rng.normal()), old))
    groups.append(group)
  return groups


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _plural(n: int, word: str, plural: str = "") -> str:
  return f"{n} {word if n == 1 else plural or word + 's'}"


def micro_batch_options(rows: int, remat: str) -> list[tuple[str, tuple[str, int]]]:
  """A layout's update configurations, best first, as (name, (remat, rows per micro-batch)):
  under `remat` the fewest micro-batches first (rows per micro-batch: the divisors of
  `rows`, largest first, so no micro-batch holds padding rows), then the same under remat
  "full" (the least scratch) if `remat` is another policy."""
  sizes = [r for r in range(rows, 0, -1) if rows % r == 0]
  return [(f"{_plural(r, 'row')} x {_plural(rows // r, 'micro-batch', 'micro-batches')}, "
           f"remat {policy}", (policy, r))
          for policy in dict.fromkeys((remat, "full")) for r in sizes]


def layout_spec(batch: dict[str, np.ndarray], rows: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The update's inputs of one micro-batch of `rows` rows, as shapes [rows, T]."""
  return {k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype)
          for k, v in batch.items() if k in POLICY_INPUTS}


def update_bytes(abstract_state: Any, batch: dict[str, np.ndarray], rows_per_micro_batch: int,
                 scratch: int) -> tuple[int, str]:
  """Device bytes of one layout's update in micro-batches of `rows_per_micro_batch` rows
  whose gradient pass needs `scratch` bytes (XLA's temp allocation) -> (bytes, their sum as
  text): the train state (weights, AdamW moments), the summed gradient and, from the
  second micro-batch on, the micro-batch's own gradient beside it (one gradient when a
  single micro-batch holds every row), one micro-batch of inputs and the scratch. The
  optimizer's apply comes after the last micro-batch's gradient is freed, with less live."""
  state, grad = tree_bytes(abstract_state), tree_bytes(abstract_state.params)
  grads = 1 if rows_per_micro_batch == len(batch["tokens"]) else 2
  inputs = tree_bytes(layout_spec(batch, rows_per_micro_batch))
  return state + grads * grad + inputs + scratch, (
      f"{gib(state)} state + {grads} x {gib(grad)} gradient + {gib(scratch + inputs)} "
      "scratch and inputs")


def plan_layout(label: str, batch: dict[str, np.ndarray], remat: str, limit: int | None,
                abstract_state: Any, update_for: Callable[[str, int], AccumulatedPolicyUpdate]
                ) -> Fit:
  """The micro-batching of one layout's update that fits `limit` bytes (first_fit over
  micro_batch_options, bytes from update_bytes); nothing is allocated: each option measured
  is one compile of its gradient pass for the abstract state's shapes and shardings (the
  update's later call at those shapes reuses it). update_for(remat, rows per micro-batch)
  -> the update (one object per option, so its compile is kept). Where the state and one
  gradient alone exceed `limit`, nothing is compiled."""
  state, grad = tree_bytes(abstract_state), tree_bytes(abstract_state.params)
  if limit and state + grad > limit:
    return Fit(None, (f"{label} does not fit: {gib(state)} state + {gib(grad)} gradient = "
                      f"{gib(state + grad)} > {gib(limit)} usable, before any activation"),
               {}, [])

  def scratch(option: tuple[str, int]) -> int | None:
    policy, per = option
    return update_for(policy, per).micro_batch_temp_bytes(abstract_state.params,
                                                          layout_spec(batch, per))

  return first_fit(label, micro_batch_options(len(batch["tokens"]), remat), limit, scratch,
                   lambda option, temp: update_bytes(abstract_state, batch, option[1], temp),
                   " (a micro-batch of 1 row under remat full is the least this layout needs)")


def plan_note(label: str, fit: Fit, limit: int | None) -> str:
  """The `note:` (a choice) or `error:` (none fits) line for a layout's plan."""
  if fit.choice is None:
    return f"error: {SCRIPT}: {fit.line}"
  if fit.line:
    return f"note: {SCRIPT}: {fit.line}"
  if fit.tried:
    return f"note: {SCRIPT}: {label} uses {fit.tried[0]} <= {gib(limit)} usable"
  policy, per = fit.choice
  return (f"note: {SCRIPT}: {label} uses {_plural(per, 'row')} per micro-batch, remat "
          f"{policy}: the device reports no memory limit (--memory-limit-gib sets one), "
          "nothing checked")


def updates_of(config: ModelConfig, optimizer: optax.GradientTransformation,
               objective: ObjectiveConfig) -> Callable[[str, int], AccumulatedPolicyUpdate]:
  """(remat, rows per micro-batch) -> the update of `config` under that remat policy, one
  object per pair (its compiles live in it, so the plan's compile serves the timed run)."""
  updates = {}

  def update_for(remat: str, rows: int) -> AccumulatedPolicyUpdate:
    if (remat, rows) not in updates:
      updates[(remat, rows)] = AccumulatedPolicyUpdate(
          dataclasses.replace(config, remat_policy=remat), optimizer, objective, rows,
          loss_chunk=LOSS_CHUNK)
    return updates[(remat, rows)]

  return update_for


def one_device_mesh() -> Any:
  """The benchmark's mesh: the first device alone (the report is one device's update, and
  the fit check is of one device's memory)."""
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def abstract_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                   mesh: Any) -> Any:
  """The train state's shapes with the shardings init_sharded_state gives it, unallocated."""
  abstract, shardings = state_shardings(config, optimizer, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def time_update(update: AccumulatedPolicyUpdate, state: Any, batch: dict[str, np.ndarray],
                repeats: int) -> tuple[float, Any, dict[str, float]]:
  """Seconds per update over `repeats` after a warm-up update (the compiles) -> (seconds,
  state after the last update: the update donates the one it is given, metrics)."""
  inputs = {k: batch[k] for k in POLICY_INPUTS if k in batch}
  state, metrics = update(state, inputs)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = update(state, inputs)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / repeats, state, metrics


HIGH_SHARING = dict(groups=1, branch1=8, branch2=1, prompt=8192, turn=64, tool=128,
                    extra_turns=2)
TINY = dict(preset="tiny", num_layers=1, groups=1, branch1=4, branch2=1, prompt=64, turn=8, tool=8,
            extra_turns=1, repeats=1)


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--groups", type=int, default=4)
  parser.add_argument("--branch1", type=int, default=4)
  parser.add_argument("--branch2", type=int, default=2)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--turn", type=int, default=64)
  parser.add_argument("--tool", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16 on GPU")
  parser.add_argument("--remat", default="none",
                      help="remat policy of both layouts' updates (\"full\" for a layout "
                           "that fits no other way)")
  parser.add_argument("--extra-turns", type=int, default=0)
  parser.add_argument("--num-layers", type=int, default=0, help="override the preset's (0: keep)")
  parser.add_argument("--attention", default="auto",
                      help="comma-separated model attention backends to time, e.g. tree_mgpu,reference")
  parser.add_argument("--memory-limit-gib", type=float, default=0.0,
                      help="usable device memory for the fit check (default: the device's "
                           "bytes_limit; CPU reports none, so nothing is checked there)")
  parser.add_argument("--high-sharing", action="store_true",
                      help=f"issue 25's agentic workload: {HIGH_SHARING}")
  parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run: {TINY}")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  for flag, preset in (("high_sharing", HIGH_SHARING), ("tiny", TINY)):
    if getattr(args, flag):
      for key, value in preset.items():
        setattr(args, key, value)
  return args


def layouts(args, config: ModelConfig, objective: ObjectiveConfig
            ) -> dict[str, dict[str, np.ndarray]]:
  """The workload's rollouts as {"tree": packed trees [B, T], "unrolled": one row per
  trajectory [N, T']}, rows padded to multiples of 128 tokens."""
  groups = synthetic_groups(args.groups, args.branch1, args.branch2, args.prompt, args.turn,
                            args.tool, min(config.vocab_size, 256),
                            extra_turns=args.extra_turns)
  trees = build_trees(groups, objective)
  tree_len = _round_up(max(t.num_nodes for t in trees), 128)
  traj_len = _round_up(max(len(t.tokens) for g in groups for t in g), 128)
  return {"tree": pack_trees(trees, tree_len, pad_id=0),
          "unrolled": unrolled_batch(groups, objective, traj_len, pad_id=0)}


def _summary(results: dict) -> None:
  """Adds the tree's speed-up over unrolled and its ratio to the token ratio (the target)."""
  tree, flat = results.get("tree", {}), results.get("unrolled", {})
  if "step_s" in tree and "step_s" in flat:
    results["speedup"] = flat["step_s"] / tree["step_s"]
    results["token_ratio"] = flat["tokens"] / tree["tokens"]
    results["speedup_over_token_ratio"] = results["speedup"] / results["token_ratio"]
    results["target_met"] = results["speedup_over_token_ratio"] >= TARGET


def print_table(by_attention: dict) -> None:
  print(f"{'attention':12} {'layout':9} {'rows':>5} {'micro-b.':>8} {'rows/mb':>7} "
        f"{'remat':>6} {'tokens':>8} {'step s':>8} {'tokens/s':>9}")
  for attention, results in by_attention.items():
    for name in ("tree", "unrolled"):
      r = results.get(name, {})
      if "step_s" not in r:
        why = ("does not fit (error line above)" if r.get("status") == "does_not_fit"
               else r.get("error", "not run")[:60])
        print(f"{attention:12} {name:9} {why}")
        continue
      print(f"{attention:12} {name:9} {r['rows']:>5} {r['micro_batches']:>8} "
            f"{r['rows_per_micro_batch']:>7} {r['remat']:>6} {r['tokens']:>8} "
            f"{r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f}")
    if "speedup" in results:
      print(f"{attention:12} speed-up {results['speedup']:.2f}x, token ratio "
            f"{results['token_ratio']:.2f}, speed-up / token ratio "
            f"{results['speedup_over_token_ratio']:.3f} (target >= {TARGET})")


def main(argv=None) -> dict:
  """Runs the benchmark; exits 1 (SystemExit) after the report is written if a layout fits
  the device no way."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # before the GPU starts
  args = _parse(argv)
  overrides = {"num_layers": args.num_layers} if args.num_layers else {}
  config = get_preset(args.preset, dtype=args.dtype, remat_policy=args.remat, **overrides)
  objective = ObjectiveConfig(eps_high=0.28)
  batches = layouts(args, config, objective)
  optimizer = optax.adamw(1e-4)
  mesh = one_device_mesh()
  limit = int(args.memory_limit_gib * 2**30) or device_bytes_limit(jax.devices()[0])
  by_attention, failed = {}, []
  report = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "preset": args.preset, "args": vars(args), "bytes_limit": limit,
            "versions": {"python": platform.python_version(), "jax": jax.__version__},
            "results": by_attention, "backend": jax.default_backend()}
  with sharding_context(mesh):
    abstract = abstract_state(config, optimizer, mesh)
    plans = {}
    for attention in args.attention.split(","):
      update_for = updates_of(dataclasses.replace(config, attention_backend=attention),
                              optimizer, objective)
      by_attention[attention] = results = {}
      for name, batch in batches.items():
        label = f"{attention} {name} [{len(batch['tokens'])} x {batch['tokens'].shape[1]}]"
        try:
          fit = plan_layout(label, batch, args.remat, limit, abstract, update_for)
        except Exception as e:  # pylint: disable=broad-except  # e.g. a kernel fails to compile
          results[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
          print(f"error: {SCRIPT}: {label}: {results[name]['error']}", flush=True)
          continue
        note = plan_note(label, fit, limit)
        print(note, flush=True)
        if fit.choice is None:
          failed.append(label)
          results[name] = {"status": "does_not_fit", "error": fit.line,
                           "scratch_bytes": {f"{p} {r}": t for (p, r), t in fit.scratch.items()}}
          continue
        plans[(attention, name)] = (fit, note, update_for(*fit.choice))
    write_report(args.out, report)
    state = init_sharded_state(config, optimizer, mesh, jax.random.key(0))[0] if plans else None
    for attention, results in by_attention.items():
      for name, batch in batches.items():
        if (attention, name) not in plans:
          continue
        fit, note, update = plans[(attention, name)]
        policy, per = fit.choice
        rows = len(batch["tokens"])
        try:
          seconds, state, metrics = time_update(update, state, batch, args.repeats)
        except Exception as e:  # pylint: disable=broad-except  # recorded, the others still run
          results[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
          continue
        tokens = int(np.sum(batch["segment_ids"] > 0))
        results[name] = {
            "rows": rows, "row_length": int(batch["tokens"].shape[1]),
            "micro_batches": rows // per, "rows_per_micro_batch": per, "remat": policy,
            "tokens": tokens, "slots": int(batch["tokens"].size), "step_s": seconds,
            "tokens_per_s": tokens / seconds, "slots_per_s": batch["tokens"].size / seconds,
            "loss": metrics["loss"], "plan": note,
            "scratch_bytes": fit.scratch.get(fit.choice)}
      _summary(results)
      print(f"attention {attention}: {json.dumps(results)}", flush=True)
      write_report(args.out, report)  # kept if a later backend is cut off by a time limit
  print_table(by_attention)
  if failed:
    report["status"] = "does_not_fit"
    write_report(args.out, report)
    print(f"error: {SCRIPT}: {', '.join(failed)} fit the device no way (lines above)",
          flush=True)
    raise SystemExit(1)
  return report


if __name__ == "__main__":
  main()
