"""One RL step end to end (rollout, reward, log-probs, update, weight push), k = 0 and k = 1.

  PYTHONPATH=$PWD python benchmarks/rl_step.py --preset qwen2.5-1.5b --out $OUT/rl_step.json
  PYTHONPATH=$PWD python benchmarks/rl_step.py --tiny          # CPU smoke run, seconds
  PYTHONPATH=$PWD python benchmarks/rl_step.py --simulate --kv_gib 10   # decode steps, no model

The step is built from the stages' own parts: the rollout engine (continuous batching, paged
KV, a group's samples sharing the prompt's pages), `rl.pipeline.RolloutPipeline` (k = 0:
sample then update; k = 1: the next batch samples while this one trains, weights pushed after
each update, partial rollouts), rewards streamed to `tasks.rewards.RewardPool` as each sample
ends, the `rl.trajectories.TrajectoryManager`, prefix-tree packing (`rl.tree`) and one
`rl.policy_step.AccumulatedPolicyUpdate` (AdamW) over micro-batches of packed rows.

Workloads (`--workload`), both on the draw of `benchmarks/rollout.py` (`--prompts` x
`--samples`, prompts uniform in [prompt_min, prompt_max] random tokens, response lengths fixed
in advance from a lognormal; a sample stops at its drawn length, no stop ids):
  * grpo: a Step-SRPO-shaped step: each prompt's G samples form one prefix tree;
  * tree: an agentic tree step: each prompt branches `--branch1` ways, each branch gets a
    `--tool_tokens` tool output and branches `samples / branch1` ways again; each leaf's two
    turns split its drawn length in half. A branch's second turn starts as soon as its first
    turn ends (`--turn_barrier`, the baseline: after every first turn ended).
The model is random, so the reward is the math verifier (SymPy worker) on a stand-in answer
derived from the tokens: real verifier work, meaningless values.

Reported per k: generated tokens/s per device (steady state: measured steps after `--warmup`
steps; compile seconds, from jax.monitoring, reported apart), the step's time split (rollout
wait, generate, reward wait after the last sample, tree building and packing, update, weight
push; no old log-probs pass: one update per batch takes them in its own forward pass),
trained vs unrolled tokens, staleness, and tokens/s x parameters beside NeMo RL's published
on-policy GRPO rate (1,562 tokens/s per H100 at Llama-3.1-8B, ~1.25e13 parameter-tokens/s).

Memory: before anything is allocated, the static bytes (22 per parameter + the KV pool) are
checked against the device; before each run's engine, also the update's scratch for rows as
long as the draw's largest tree, twice at k >= 1 (`step_bytes`, `choose_remat`): a run that
does not fit trains with remat "full" (a `note:` line), or is reported does_not_fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import (CompileClock, add_engine_option_flags, add_workload_flags,  # noqa: E402  pylint: disable=g-import-not-at-top
                     engine_layout, engine_options, precompile, stand_in_device, workload,
                     write_report)

NEMO_PARAM_TOKENS_PER_S = 1562 * 8.03e9  # NeMo RL, Llama-3.1-8B on-policy GRPO, per H100


def rollout_sampling():
  """The rollouts' SamplingParams: temperature 1."""
  from kat_jax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  return SamplingParams(temperature=1.0)


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2.5-1.5b")
  parser.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU)")
  parser.add_argument("--workload", nargs="+", default=["grpo", "tree"],
                      choices=["grpo", "tree"])
  parser.add_argument("--k", nargs="+", type=int, default=[0, 1], help="max_staleness values")
  add_workload_flags(parser)
  parser.add_argument("--branch1", type=int, default=4, help="tree: first-turn branches")
  parser.add_argument("--tool_tokens", type=int, default=64, help="tree: tool output length")
  parser.add_argument("--turn_barrier", action="store_true",
                      help="tree, the baseline: second turns start only after every first "
                           "turn ended (default: each branch's second turn starts as its "
                           "first ends)")
  parser.add_argument("--simulate", action="store_true",
                      help="only the rollout, on the engine's host scheduler with a stand-in "
                           "device (rollout.py --simulate): decode steps and calls per "
                           "workload, no model, no update")
  parser.add_argument("--num_slots", type=int, default=128)
  parser.add_argument("--page_size", type=int, default=16)
  parser.add_argument("--attention", default="auto",
                      help="the engine's paged attention (kat_jax.kernels.paged_attention."
                           "BACKENDS)")
  parser.add_argument("--long_rows", type=int, default=None,
                      help="Engine(long_rows=...) (default: the engine's)")
  parser.add_argument("--steps_per_call", type=int, default=16)
  add_engine_option_flags(parser)
  parser.add_argument("--prefill_chunk", type=int, default=512)
  parser.add_argument("--kv_gib", type=float, default=24.0, help="page pool size in GiB")
  parser.add_argument("--micro_batch_rows", type=int, default=1)
  parser.add_argument("--seq_len", type=int, default=0,
                      help="packed row length (0: the draw's largest tree, rounded up to 1024)")
  parser.add_argument("--remat", default="full",
                      help="ModelConfig.remat_policy of the update (\"full\" where the step "
                           "does not fit the device with it)")
  parser.add_argument("--warmup", type=int, default=1, help="steps not timed (compiles)")
  parser.add_argument("--steps", type=int, default=2, help="timed steps")
  parser.add_argument("--reward_workers", type=int, default=8)
  parser.add_argument("--lr", type=float, default=1e-6)
  parser.add_argument("--out", default="")
  if parser.parse_known_args(argv)[0].tiny:
    parser.set_defaults(preset="tiny", prompts=4, samples=4, prompt_min=8, prompt_max=24,
                        mean_new=12, max_new=40, num_slots=8, page_size=4, steps_per_call=4,
                        prefill_chunk=16, kv_gib=0.01, branch1=2, tool_tokens=4, steps=1,
                        reward_workers=2, remat="none")
  return parser.parse_args(argv)


def _stand_in_answer(tokens) -> str:
  return f"\\boxed{{{int(np.sum(tokens)) % 10}}}"


class Producer:
  """Batch `index` of a workload on the engine: returns the packed host rows and its stats."""

  def __init__(self, args, config, engine, pool, objective, prompts, lengths, seq_len):
    self.args, self.config, self.engine, self.pool = args, config, engine, pool
    self.objective, self.prompts, self.lengths = objective, prompts, lengths
    self.seq_len = seq_len

  def __call__(self, index: int, weights) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from kat_jax.rl.objectives import group_advantages  # pylint: disable=g-import-not-at-top
    from kat_jax.rl.trajectories import (TrajectoryManager,  # pylint: disable=g-import-not-at-top
                                         oldest_version)
    from kat_jax.rl.tree import build_trees, pack_trees  # pylint: disable=g-import-not-at-top
    args = self.args
    manager, rewards = TrajectoryManager(), {}
    groups = [manager.new_group() for _ in self.prompts]
    key = jax.random.key(args.seed * 1000 + index)
    sampling = rollout_sampling()
    start = time.perf_counter()

    def score(iid, tokens):
      rewards[iid] = self.pool.score_async([{"response": _stand_in_answer(tokens),
                                             "verifier": {"type": "math", "answer": "3"}}])

    self.generate(key, sampling, manager, groups, score)
    generated = time.perf_counter()
    values = {iid: f.result()[0].reward for iid, f in rewards.items()}
    scored = time.perf_counter()
    reward_wait = scored - generated
    recorded = [manager.trajectories(group) for group in groups]
    trajectories = []
    for group in recorded:
      adv = group_advantages(np.array([values[t.interactions[-1]] for t in group]),
                             np.zeros(len(group), int))
      trajectories.append([t.to_trajectory(a) for t, a in zip(group, adv)])
    trees = build_trees(trajectories, self.objective)
    rows = pack_trees(trees, self.seq_len, 0)
    return {"rows": rows, "generated_tokens": self._generated,
            "tree_tokens": int(sum(t.num_nodes for t in trees)),
            "unrolled_tokens": int(sum(t.unrolled_tokens for t in trees)),
            "oldest_version": oldest_version([t for g in recorded for t in g], default=index),
            "generate_s": generated - start, "reward_wait_s": reward_wait,
            "pack_s": time.perf_counter() - scored, "seq_len": self.seq_len}

  def generate(self, key, sampling, manager, groups, score) -> None:
    """Samples the batch on the engine: records each sample in `manager` (prompt p's group
    groups[p]) and hands each trajectory's last sample to score(interaction id, tokens) as
    it ends."""
    self._generated = 0
    if self.args.workload_now == "grpo":
      self._grpo(key, sampling, manager, groups, score)
    else:
      self._tree(key, sampling, manager, groups, score)

  def _grpo(self, key, sampling, manager, groups, score):
    """One turn per prompt: G samples sharing its pages."""
    import jax  # pylint: disable=g-import-not-at-top
    from kat_jax.sampling.engine import Request  # pylint: disable=g-import-not-at-top
    owners = {}
    for p, prompt in enumerate(self.prompts):
      for sid in self.engine.submit(Request(
          prompt, [int(n) for n in self.lengths[p]], sampling=sampling,
          num_samples=self.args.samples, rng=jax.random.fold_in(key, p))):
        owners[sid] = p

    def finished(sid, c):
      p = owners[sid]
      iid = manager.record(groups[p], self.prompts[p], c.tokens, c.logprobs, c.versions)
      self._generated += len(c.tokens)
      score(iid, c.tokens)

    self.engine.run(on_finish=finished)

  def _tree(self, key, sampling, manager, groups, score):
    """Two turns per prompt: branch1 samples (kept), a tool output, then G/branch1 each.

    No turn barrier: a branch's second turn is submitted (`Engine.extend`) in the scheduler
    round its first turn ends, so second turns decode while other first turns still do. Its
    tool output and key follow from (prompt, branch) alone, so the tokens do not depend on
    the order in which first turns end."""
    import jax  # pylint: disable=g-import-not-at-top
    from kat_jax.sampling.engine import Request  # pylint: disable=g-import-not-at-top
    args, engine = self.args, self.engine
    second = args.samples // args.branch1
    rng = np.random.default_rng(args.seed + 1)
    tools = {(p, b): rng.integers(1, self.config.vocab_size, args.tool_tokens).tolist()
             for p in range(len(self.prompts)) for b in range(args.branch1)}
    first_turn, second_turn = {}, {}  # sample id -> (prompt, branch) / (prompt, context)
    for p, prompt in enumerate(self.prompts):
      half = [max(1, int(n) // 2) for n in self.lengths[p][::second][:args.branch1]]
      for b, sid in enumerate(engine.submit(Request(
          prompt, half, sampling=sampling, num_samples=args.branch1, keep=True,
          rng=jax.random.fold_in(key, p)))):
        first_turn[sid] = (p, b)

    def start_second_turn(p, b, c):
      context = list(self.prompts[p]) + list(c.tokens) + tools[(p, b)]
      rest = [max(1, int(n) - int(n) // 2) for n in self.lengths[p][b * second:(b + 1) * second]]
      for child in engine.extend(c.sequence, tools[(p, b)], max_new_tokens=rest,
                                 sampling=sampling, num_samples=second,
                                 rng=jax.random.fold_in(key, 1000 + p * 64 + b)):
        second_turn[child] = (p, context)

    waiting = []  # --turn_barrier: first turns ended, their second turns not yet submitted

    def finished(sid, c):
      self._generated += len(c.tokens)
      if sid in second_turn:
        p, context = second_turn.pop(sid)
        score(manager.record(groups[p], context, c.tokens, c.logprobs, c.versions), c.tokens)
        return
      p, b = first_turn.pop(sid)
      manager.record(groups[p], self.prompts[p], c.tokens, c.logprobs, c.versions)
      if args.turn_barrier:
        waiting.append((p, b, c))
      else:
        start_second_turn(p, b, c)

    engine.run(on_finish=finished)
    for p, b, c in sorted(waiting, key=lambda w: w[:2]):  # empty without --turn_barrier
      start_second_turn(p, b, c)
    engine.run(on_finish=finished)


def tree_sizes(args, workload_name: str, prompts, lengths) -> np.ndarray:
  """Tokens of each prompt's prefix tree [P], known before sampling since every sample stops
  at its drawn length: the prompt, every turn's tokens and (tree) the tool outputs. An upper
  bound: samples whose first tokens happen to coincide share them in the tree."""
  prompt = np.array([len(p) for p in prompts])
  if workload_name == "grpo":
    return prompt + lengths.sum(axis=1)
  second = args.samples // args.branch1
  first = np.maximum(1, lengths[:, ::second][:, :args.branch1] // 2).sum(axis=1)
  rest = np.maximum(1, lengths - lengths // 2).sum(axis=1)
  return prompt + first + args.branch1 * args.tool_tokens + rest


def kv_pages(args, config) -> int:
  """Pages of the engine's pool: `--kv_gib` of the model's KV (compute dtype)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  item = jnp.dtype(config.compute_dtype).itemsize
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * item
  return int(args.kv_gib * 2**30 / (kv_per_token * args.page_size)) + 1


def simulate(args) -> dict:
  """`--simulate`: each workload's rollout (with and, for tree, without `--turn_barrier`) on
  the engine's host scheduler with a stand-in device that makes one token per active slot
  and step: decode steps (the rollout's makespan in steps), decode calls, prefill chunks,
  slot occupancy. The pool and engine settings are the real run's (`--kv_gib` of the
  preset's KV); no model runs."""
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.trajectories import TrajectoryManager  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.engine import Engine  # pylint: disable=g-import-not-at-top
  from rollout import _stand_in_params  # pylint: disable=g-import-not-at-top
  preset = get_preset(args.preset, dtype="float32" if args.tiny else "bfloat16")
  config = get_preset("tiny", num_layers=1, max_position_embeddings=1 << 16)
  prompts, lengths = workload(args, config.vocab_size)
  runs = []
  for name in args.workload:
    for barrier in ([False, True] if name == "tree" else [False]):
      run_args = argparse.Namespace(**vars(args))
      run_args.workload_now, run_args.turn_barrier = name, barrier
      with stand_in_device():
        engine = Engine(config, _stand_in_params(), num_slots=args.num_slots,
                        num_pages=kv_pages(args, preset), page_size=args.page_size,
                        prefill_chunk=args.prefill_chunk, steps_per_call=args.steps_per_call,
                        **engine_layout(args, config, "xla" if args.attention == "auto"
                                        else args.attention), **engine_options(args))
        producer = Producer(run_args, config, engine, None, None, prompts, lengths, 0)
        manager = TrajectoryManager()
        producer.generate(jax.random.key(args.seed), rollout_sampling(), manager,
                          [manager.new_group() for _ in prompts], lambda iid, tokens: None)
      stats = engine.stats
      runs.append({"workload": name, "turn_barrier": barrier,
                   "generated_tokens": producer._generated,  # pylint: disable=protected-access
                   "decode_steps": stats["decode_steps"], "decode_calls": stats["decode_calls"],
                   "prefill_chunks": stats["prefill_chunks"],
                   "mean_slot_occupancy": stats["slot_steps"] / max(
                       1, stats["decode_steps"] * args.num_slots)})
      print(json.dumps(runs[-1]), flush=True)
  return {"simulated": True, "preset": args.preset, "kv_gib": args.kv_gib,
          "num_slots": args.num_slots, "steps_per_call": args.steps_per_call,
          "command": " ".join(["python"] + sys.argv), "runs": runs}


def update_batch(rows: dict, k: int) -> dict:
  """The update's inputs from packed rows. One update per batch: its own forward pass gives
  the proximal log-probs (no old_logp; rl.policy_step), as in the stages; off-policy (k >= 1)
  the sampled ones weight the terms."""
  batch = {key: v for key, v in rows.items() if key not in ("visits", "segment_ids", "old_logp")}
  if k:
    batch["behav_logp"] = rows["old_logp"]
  return batch


def run(args, k: int, workload_name: str, clock, bytes_limit: int | None = None) -> dict:
  """One (workload, k) run. bytes_limit: the device's usable bytes (None: unchecked); a step
  that does not fit it with any remat policy returns status does_not_fit before the engine
  allocates its pool."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  from kat_jax.parallel import make_mesh  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.objectives import ObjectiveConfig  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.pipeline import (RolloutPipeline, RolloutWeights,  # pylint: disable=g-import-not-at-top
                                   decode_weights_fn)
  from kat_jax.rl.policy_step import AccumulatedPolicyUpdate  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.tree import pack_trees  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import prepare_params  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.engine import Engine  # pylint: disable=g-import-not-at-top
  from kat_jax.tasks.rewards import RewardPool  # pylint: disable=g-import-not-at-top
  from kat_jax.train.state import init_sharded_state  # pylint: disable=g-import-not-at-top

  args.workload_now = workload_name
  dtype = "float32" if args.tiny else "bfloat16"
  overrides = dict(num_layers=1) if args.tiny else {}
  config = get_preset(args.preset, dtype=dtype, param_dtype="float32",
                      remat_policy=args.remat, **overrides)
  mesh = make_mesh(-1, 1, 1)
  optimizer = optax.adamw(args.lr)
  state, _ = init_sharded_state(config, optimizer, mesh, jax.random.key(args.seed))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  objective = ObjectiveConfig(eps_low=0.2, eps_high=0.28, loss_agg_mode="token-mean")
  prompts, lengths = workload(args, config.vocab_size)
  largest = int(tree_sizes(args, workload_name, prompts, lengths).max())
  seq_len = args.seq_len or -(-largest // 1024) * 1024
  spec = {key: jax.ShapeDtypeStruct((args.micro_batch_rows, seq_len), v.dtype)
          for key, v in update_batch(pack_trees([], seq_len, 0), k).items()}
  updates = {}

  def make_update(remat: str) -> AccumulatedPolicyUpdate:
    if remat not in updates:
      updates[remat] = AccumulatedPolicyUpdate(
          dataclasses.replace(config, remat_policy=remat), optimizer, objective,
          args.micro_batch_rows, loss_chunk=1024)
    return updates[remat]

  label = f"{args.preset} {workload_name} k={k} (rows of {seq_len} tokens)"
  remat, line, temps = choose_remat(
      label, args.remat, k, n_params, args.kv_gib, bytes_limit,
      lambda policy: make_update(policy).micro_batch_temp_bytes(state.params, spec))
  if remat is None:
    print(f"error: benchmarks/rl_step.py: {line}", flush=True)
    return {"k": k, "workload": workload_name, "params": n_params, "status": "does_not_fit",
            "error": line, "update_temp_bytes": temps}
  if line:
    print(f"note: benchmarks/rl_step.py: {line}", flush=True)
  update = make_update(remat)
  engine = Engine(config, prepare_params(state.params, config, mesh), num_slots=args.num_slots,
                  num_pages=kv_pages(args, config), page_size=args.page_size,
                  prefill_chunk=args.prefill_chunk, steps_per_call=args.steps_per_call,
                  **engine_layout(args, config, args.attention), **engine_options(args))
  tree = workload_name == "tree"  # its second turns prefill onto whole first turns
  precompiled = precompile(args, engine, clock, (rollout_sampling(),),
                           args.prompt_max + args.max_new + tree * args.tool_tokens,
                           None if tree else args.prompt_max)
  pool = RewardPool(max_workers=args.reward_workers)
  weights = RolloutWeights(decode_weights_fn(config, mesh, mesh, own_copy=k > 0))
  weights.attach(engine)
  producer = Producer(args, config, engine, pool, objective, prompts, lengths, seq_len)
  total = args.warmup + args.steps
  pipeline = RolloutPipeline(producer, weights, max_staleness=k, end=total)
  steps = []
  pipeline.start(state.params, 0)
  try:
    for step in range(total):
      t0, c0 = time.perf_counter(), clock.total
      produced, waited = pipeline.take(step, state.params)
      out = produced.value
      batch = update_batch(out["rows"], k)
      rows = len(batch["tokens"])
      if rows % args.micro_batch_rows:
        from kat_jax.data.packing import pad_batch_rows  # pylint: disable=g-import-not-at-top
        batch = pad_batch_rows(batch, args.micro_batch_rows, 0)
      t2 = time.perf_counter()
      state, metrics = update(state, batch)
      t3 = time.perf_counter()
      pipeline.trained(state.params, step + 1)
      t4 = time.perf_counter()
      record = {"step": step, "seconds": t4 - t0, "compile_s": clock.total - c0,
                "rollout_wait_s": waited, "produce_s": produced.seconds,
                "generate_s": out["generate_s"], "reward_wait_s": out["reward_wait_s"],
                "pack_s": out["pack_s"], "update_s": t3 - t2,
                "weight_push_s": (t4 - t3) if k else weights.push_seconds,
                "generated_tokens": out["generated_tokens"], "tree_tokens": out["tree_tokens"],
                "unrolled_tokens": out["unrolled_tokens"], "rows": rows,
                "seq_len": out["seq_len"], "staleness": step - out["oldest_version"],
                "loss": metrics["loss"], "is_weight_mean": metrics.get("is_weight_mean")}
      steps.append(record)
      print(f"  {workload_name} k={k} step {step}: {record['seconds']:.1f}s "
            f"(compile {record['compile_s']:.1f}s) generated {record['generated_tokens']} "
            f"wait {waited:.1f}s pack {out['pack_s']:.1f}s update {t3 - t2:.1f}s", flush=True)
  finally:
    pipeline.close()
    pool.close()
  timed = steps[args.warmup:] or steps
  wall = sum(s["seconds"] - s["compile_s"] for s in timed)
  tokens = sum(s["generated_tokens"] for s in timed)
  per_device = tokens / wall / jax.device_count()
  split = {key: float(np.mean([s[key] for s in timed]))
           for key in ("seconds", "compile_s", "rollout_wait_s", "produce_s", "generate_s",
                       "reward_wait_s", "pack_s", "update_s", "weight_push_s")}
  return {"k": k, "workload": workload_name, "params": n_params, "remat": remat,
          "update_temp_bytes": temps.get(remat),
          "engine": {"attention": engine.attention, "long_rows": engine.long_rows,
                     "num_slots": engine.num_slots,
                     "compact_widths": list(engine.compact_widths),
                     "compact_calls": engine.stats["compact_calls"],
                     "precompile": precompiled},
          "tokens_per_s_per_device": per_device,
          "param_tokens_per_s_per_device": per_device * n_params,
          "over_nemo_rl_param_tokens": per_device * n_params / NEMO_PARAM_TOKENS_PER_S,
          "rollout_share_of_step": split["produce_s"] / split["seconds"] if not k else None,
          "mean_split_s": split, "steps": steps}


# Bytes per parameter held for a whole step on a device: f32 weights (4), AdamW's two f32
# moments (8), the accumulated f32 gradient (4), one micro-batch's f32 gradient (4) and the
# rollout engine's compute-dtype copy of the weights (2 in bf16).
STATIC_BYTES_PER_PARAM = 4 + 8 + 4 + 4 + 2


def static_bytes(num_params: int, kv_gib: float) -> int:
  """Bytes a step holds before any activation: the per-parameter state above on one device
  (the benchmark's mesh is data-parallel) plus the engine's KV page pool."""
  return num_params * STATIC_BYTES_PER_PARAM + int(kv_gib * 2**30)


def step_bytes(num_params: int, kv_gib: float, update_temp: int, k: int) -> int:
  """Bytes a step needs on its one device: the static bytes and the update's scratch, once
  at k = 0 and twice at k >= 1. There the next batch's rollout allocates and frees beside the
  update, and the free memory can end up in pieces while the scratch is one contiguous buffer
  (XLA on GPU): a tree step at k = 1 stalled in the allocator asking for its 16.2 GiB scratch
  with 24 GiB free in two pieces. So k >= 1 keeps a second scratch-sized span free."""
  return static_bytes(num_params, kv_gib) + (2 if k else 1) * update_temp


def choose_remat(label: str, requested: str, k: int, num_params: int, kv_gib: float,
                 limit: int | None, update_temp: Callable[[str], int | None]
                 ) -> tuple[str | None, str, dict[str, int]]:
  """The update's remat policy for a run: `requested` if the step fits `limit` bytes, else
  "full" (the least scratch: only each layer's input is kept), else None: it does not fit.
  update_temp(policy) -> the update's scratch bytes (None: the backend does not say).
  -> (policy or None, '' when `requested` fits or `limit` is unknown, else the arithmetic:
  the reason for "full" or the does-not-fit error, {policy: scratch bytes measured})."""
  from kat_jax.train.memory_fit import first_fit  # pylint: disable=g-import-not-at-top

  def need(remat: str, temp: int) -> tuple[int, str]:
    return step_bytes(num_params, kv_gib, temp, k), (
        f"{static_bytes(num_params, 0) / 2**30:.1f} GiB static ({num_params / 1e9:.2f}B "
        f"parameters x {STATIC_BYTES_PER_PARAM} bytes) + {kv_gib:g} GiB KV + "
        f"{'2 x ' if k else ''}{temp / 2**30:.2f} GiB update scratch")

  policies = dict.fromkeys((requested, "full"))
  fit = first_fit(label, [(f"remat {p}", p) for p in policies], limit, update_temp, need,
                  " (k >= 1: a second scratch span for the rollout beside the update)" if k
                  else "")
  return fit.choice, fit.line, fit.scratch


def main(argv=None) -> dict:
  args = _parse(argv)
  if args.simulate:
    report = simulate(args)
    write_report(args.out, report)
    return report
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import jax  # pylint: disable=g-import-not-at-top
  clock = CompileClock(jax)
  results = []
  report = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "preset": args.preset, "workload": {
                "prompts": args.prompts, "samples": args.samples,
                "prompt_tokens": [args.prompt_min, args.prompt_max],
                "response_lengths": {"lognormal_mean": args.mean_new, "sigma": args.sigma,
                                     "max": args.max_new},
                "tree": {"branch1": args.branch1, "tool_tokens": args.tool_tokens}},
            "results": results,
            "versions": {"python": platform.python_version(), "jax": jax.__version__}}
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  from kat_jax.train.memory_fit import device_bytes_limit  # pylint: disable=g-import-not-at-top
  num_params = get_preset(args.preset).num_params()
  need = static_bytes(num_params, args.kv_gib)
  limit = report["bytes_limit"] = device_bytes_limit(jax.devices()[0])
  if limit and need > limit:
    report["status"] = "does_not_fit"
    report["error"] = (f"{args.preset}: {num_params / 1e9:.2f}B parameters x "
                       f"{STATIC_BYTES_PER_PARAM} bytes (f32 weights, AdamW moments, two f32 "
                       f"gradients, bf16 rollout weights) + {args.kv_gib:g} GiB KV = "
                       f"{need / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB usable on "
                       f"{report['device']}, before activations")
    print(f"error: benchmarks/rl_step.py: {report['error']}", flush=True)
    write_report(args.out, report)
    return report
  for name in args.workload:
    for k in args.k:
      print(f"{args.preset} {name} k={k}", flush=True)
      results.append(run(args, k, name, clock, limit))
      write_report(args.out, report)  # kept if a later run is cut off by a time limit
  print(f"{'workload':8} {'k':>2} {'tok/s/dev':>10} {'param-tok/s':>12} {'step s':>8} "
        f"{'rollout%':>8} {'gen s':>7} {'rew s':>6} {'pack s':>7} {'upd s':>7} {'push s':>7}")
  for r in results:
    if r.get("status") == "does_not_fit":
      print(f"{r['workload']:8} {r['k']:>2} does not fit (error above)")
      continue
    s = r["mean_split_s"]
    share = f"{100 * r['rollout_share_of_step']:.0f}" if r["rollout_share_of_step"] else "-"
    print(f"{r['workload']:8} {r['k']:>2} {r['tokens_per_s_per_device']:>10.0f} "
          f"{r['param_tokens_per_s_per_device']:>12.3g} {s['seconds']:>8.1f} {share:>8} "
          f"{s['generate_s']:>7.1f} {s['reward_wait_s']:>6.2f} {s['pack_s']:>7.1f} "
          f"{s['update_s']:>7.1f} {s['weight_push_s']:>7.2f}")
  if args.out:
    print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
