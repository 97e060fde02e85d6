"""The same policy update, tree-packed vs unrolled: time and tokens per step.

    python benchmarks/tree_vs_unrolled.py --out benchmarks/results/agentic_tree_vs_unrolled_cpu.json

Rollouts are synthetic multi-turn trees with the shape of an agentic group: one prompt, a first
turn shared by `branch2` episodes, `branch1` first-turn branches, a tool output and a second
turn per episode (`tokens` sets the segment lengths). Both layouts hold the same trajectories
and give the same loss (tests/agentic/test_tree_exactness.py); this measures the cost. Each
layout's step is jitted once and timed over `--repeats` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import jax
import numpy as np
import optax

from kat_jax.rl.tree import Trajectory, build_trees, pack_trees, unrolled_batch
from kat_jax.model import get_preset
from kat_jax.train.state import init_sharded_state
from kat_jax.parallel import make_mesh, sharding_context
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import POLICY_INPUTS, make_policy_step


def synthetic_groups(num_groups: int, branch1: int, branch2: int, prompt: int, turn: int,
                     tool: int, vocab: int, seed: int = 0) -> list[list[Trajectory]]:
  """Groups of branch1 x branch2 two-turn episodes sharing the prompt and first turns."""
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
        # the context determines the behaviour log-prob: shared prefix, shared value
        old = [-1.0 - (hash(tuple(tokens[:i + 1])) % 100) / 100 for i in range(len(tokens))]
        group.append(Trajectory(tokens, mask, float(rng.normal()), old))
    groups.append(group)
  return groups


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def time_layout(step_fn, state, batch, repeats: int) -> tuple[float, Any]:
  inputs = {k: batch[k] for k in POLICY_INPUTS}
  state, metrics = step_fn(state, inputs)  # compile + warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step_fn(state, inputs)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / repeats, state


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--groups", type=int, default=4)
  parser.add_argument("--branch1", type=int, default=4)
  parser.add_argument("--branch2", type=int, default=2)
  parser.add_argument("--prompt", type=int, default=256)
  parser.add_argument("--turn", type=int, default=64)
  parser.add_argument("--tool", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16 on GPU")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  config = get_preset(args.preset, dtype=args.dtype, remat_policy=args.remat)
  groups = synthetic_groups(args.groups, args.branch1, args.branch2, args.prompt, args.turn,
                            args.tool, min(config.vocab_size, 256))
  objective = ObjectiveConfig(eps_high=0.28)
  trees = build_trees(groups, objective)
  tree_len = _round_up(max(t.num_nodes for t in trees), 128)
  tree_batch = pack_trees(trees, tree_len, pad_id=0)
  traj_len = _round_up(max(len(t.tokens) for g in groups for t in g), 128)
  flat_batch = unrolled_batch(groups, objective, traj_len, pad_id=0)
  optimizer = optax.adamw(1e-4)
  mesh = make_mesh(-1, 1, 1)
  results = {}
  with sharding_context(mesh):
    state, _ = init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    step_fn = jax.jit(make_policy_step(config, optimizer, objective, loss_chunk=512))
    for name, batch in (("tree", tree_batch), ("unrolled", flat_batch)):
      seconds, _ = time_layout(step_fn, state, batch, args.repeats)
      real = int(np.sum(batch["segment_ids"] > 0))
      results[name] = {"batch_shape": list(batch["tokens"].shape), "real_tokens": real,
                       "slots": int(batch["tokens"].size), "step_s": seconds,
                       "slots_per_s": batch["tokens"].size / seconds}
  results["speedup"] = results["unrolled"]["step_s"] / results["tree"]["step_s"]
  results["token_ratio"] = results["unrolled"]["real_tokens"] / results["tree"]["real_tokens"]
  report = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "preset": args.preset, "args": vars(args), "results": results,
            "backend": jax.default_backend()}
  print(json.dumps(report, indent=1))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
