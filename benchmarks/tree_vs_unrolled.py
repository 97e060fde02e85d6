"""The same policy update, tree-packed vs unrolled: time and tokens per step.

    python benchmarks/tree_vs_unrolled.py --out benchmarks/results/agentic_tree_vs_unrolled_cpu.json
    python benchmarks/tree_vs_unrolled.py --tiny          # CPU smoke run (a unit test runs it)
    python benchmarks/tree_vs_unrolled.py --high-sharing --preset qwen2.5-1.5b \
        --dtype bfloat16 --attention tree_mgpu --out $OUT/tree_vs_unrolled.json   # GPU

Rollouts are synthetic multi-turn trees with the shape of an agentic group: one prompt, a first
turn shared by `branch2` episodes, `branch1` first-turn branches, a tool output and a second
turn per episode, then `extra_turns` more (tool output, turn) pairs of its own (`--prompt`,
`--turn`, `--tool` set the segment lengths). `--high-sharing` is issue 25's workload: an 8K
shared prompt, 8 branches, 4 assistant turns with 3 tool outputs per episode (token ratio
5.3). Both layouts hold the same trajectories and give the same loss
(tests/agentic/test_tree_exactness.py); this measures the cost. Each layout's step is jitted
once and timed over `--repeats` calls after a warm-up, for every `--attention` backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import write_report  # noqa: E402  pylint: disable=g-import-not-at-top


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


def time_layout(step_fn, state, batch, repeats: int) -> tuple[float, Any]:
  inputs = {k: batch[k] for k in POLICY_INPUTS if k in batch}
  state, metrics = step_fn(state, inputs)  # compile + warm-up
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step_fn(state, inputs)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / repeats, state


HIGH_SHARING = dict(groups=1, branch1=8, branch2=1, prompt=8192, turn=64, tool=128,
                    extra_turns=2)
TINY = dict(preset="tiny", num_layers=1, groups=1, branch1=4, branch2=1, prompt=64, turn=8, tool=8,
            extra_turns=1, repeats=1)


def main(argv=None) -> dict:
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
  parser.add_argument("--extra-turns", type=int, default=0)
  parser.add_argument("--num-layers", type=int, default=0, help="override the preset's (0: keep)")
  parser.add_argument("--attention", default="auto",
                      help="comma-separated model attention backends to time, e.g. tree_mgpu,reference")
  parser.add_argument("--high-sharing", action="store_true",
                      help=f"issue 25's agentic workload: {HIGH_SHARING}")
  parser.add_argument("--tiny", action="store_true", help=f"CPU smoke run: {TINY}")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  for flag, preset in (("high_sharing", HIGH_SHARING), ("tiny", TINY)):
    if getattr(args, flag):
      for key, value in preset.items():
        setattr(args, key, value)

  overrides = {"num_layers": args.num_layers} if args.num_layers else {}
  config = get_preset(args.preset, dtype=args.dtype, remat_policy=args.remat, **overrides)
  groups = synthetic_groups(args.groups, args.branch1, args.branch2, args.prompt, args.turn,
                            args.tool, min(config.vocab_size, 256),
                            extra_turns=args.extra_turns)
  objective = ObjectiveConfig(eps_high=0.28)
  trees = build_trees(groups, objective)
  tree_len = _round_up(max(t.num_nodes for t in trees), 128)
  tree_batch = pack_trees(trees, tree_len, pad_id=0)
  traj_len = _round_up(max(len(t.tokens) for g in groups for t in g), 128)
  flat_batch = unrolled_batch(groups, objective, traj_len, pad_id=0)
  optimizer = optax.adamw(1e-4)
  mesh = make_mesh(-1, 1, 1)
  by_attention = {}
  report = {"device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
            "preset": args.preset, "args": vars(args), "results": by_attention,
            "backend": jax.default_backend()}
  with sharding_context(mesh):
    state, _ = init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    for attention in args.attention.split(","):
      step_config = dataclasses.replace(config, attention_backend=attention)
      step_fn = jax.jit(make_policy_step(step_config, optimizer, objective, loss_chunk=512))
      results = {}
      for name, batch in (("tree", tree_batch), ("unrolled", flat_batch)):
        try:
          seconds, _ = time_layout(step_fn, state, batch, args.repeats)
        except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory
          results[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
          continue
        real = int(np.sum(batch["segment_ids"] > 0))
        results[name] = {"batch_shape": list(batch["tokens"].shape), "real_tokens": real,
                         "slots": int(batch["tokens"].size), "step_s": seconds,
                         "slots_per_s": batch["tokens"].size / seconds}
      if all("step_s" in results[n] for n in ("tree", "unrolled")):
        results["speedup"] = results["unrolled"]["step_s"] / results["tree"]["step_s"]
        results["token_ratio"] = (results["unrolled"]["real_tokens"]
                                  / results["tree"]["real_tokens"])
        # issue 25's target: the tree step at least 0.85x its token ratio faster
        results["speedup_over_token_ratio"] = results["speedup"] / results["token_ratio"]
      by_attention[attention] = results
      print(f"attention {attention}: {json.dumps(results)}", flush=True)
      write_report(args.out, report)  # kept if a later backend is cut off by a time limit
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
