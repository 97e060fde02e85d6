"""Rollout engine (continuous batching, paged KV) vs the static Sampler on an RL-shaped workload.

  PYTHONPATH=$PWD python benchmarks/rollout.py --preset qwen2.5-1.5b --out $OUT/rollout.json
  PYTHONPATH=$PWD python benchmarks/rollout.py --tiny          # CPU, tiny model, seconds
  PYTHONPATH=$PWD python benchmarks/rollout.py --skip_static --ab
      # the engine with tail compaction off, then on (its default)

Workload (issue #23): `--prompts` prompts × `--samples` samples (a GRPO group shares its
prompt), prompt lengths uniform in [prompt_min, prompt_max], random tokens; every sample's
response length is drawn in advance from a lognormal (mean `--mean_new`, clipped to
[1, max_new]) and the sample stops there (its max_new_tokens; no stop ids), so both engines do
the same work. Random bf16 weights, temperature-1 sampling.

Reported: generated tokens/s and time to finish the batch (device compilation excluded: it is
measured with jax.monitoring and reported apart), mean slot occupancy, KV memory held vs live
tokens (sampled during the run), and the decode step time at full occupancy against its
bandwidth floor: (weight bytes + live KV bytes read per step) / the copy bandwidth measured in
the same run. The static Sampler runs the same samples in batches of `--static_batch_prompts`
prompts (each batch until its longest sample; only drawn tokens count as generated);
`--static_batches N` runs the first N batches and reports their tokens/s (batches are drawn
alike).

Imports no grain / ml_collections (absent on the GPU machine).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np

import device_profile  # this folder is on sys.path: the script's own, or benchmark_module's

AB_RUNS = ("base", "compact")  # --ab's engine runs (ab_variants)


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2.5-1.5b")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny model and workload on any backend (a CPU smoke run)")
  add_workload_flags(parser)
  parser.add_argument("--num_slots", type=int, default=128)
  parser.add_argument("--page_size", type=int, default=16)
  parser.add_argument("--kv_gib", type=float, default=40.0,
                      help="page pool cap in GiB (the pool is also capped at what every slot "
                           "could need)")
  parser.add_argument("--steps_per_call", type=int, default=16)
  parser.add_argument("--prefill_chunk", type=int, default=512)
  parser.add_argument("--prefill_chunks_per_call", type=int, default=1)
  parser.add_argument("--attention", default="auto",
                      help="paged attention backend (kat_jax.kernels.paged_attention.BACKENDS)")
  parser.add_argument("--long_rows", type=int, default=None,
                      help="Engine(long_rows=...): slots attending over the whole page table "
                           "(default: the engine's, 8 for XLA attention and 0 for a kernel "
                           "that reads only live pages)")
  add_engine_option_flags(parser)
  parser.add_argument("--ab", action="store_true",
                      help="run the engine several times in one process on the same draw: "
                           "--ab_runs of base (compaction off) and compact (--compact_widths, "
                           "default the engine's); each run's report lands in `variants` (the "
                           "first is `engine`) with its tokens/s and tail step times, and "
                           "whether its tokens and log-probs equal the first run's")
  parser.add_argument("--ab_runs", nargs="+", default=list(AB_RUNS), choices=AB_RUNS,
                      help="--ab's runs, in this order")
  parser.add_argument("--static_batch_prompts", type=int, default=8)
  parser.add_argument("--static_batches", type=int, default=1, help="0: all")
  parser.add_argument("--skip_static", action="store_true")
  parser.add_argument("--memory_every", type=int, default=16,
                      help="sample KV memory every N scheduler rounds")
  parser.add_argument("--simulate", action="store_true",
                      help="run only the engine's host scheduler on the workload, with a "
                           "stand-in device (every active slot makes one token per step): "
                           "occupancy, calls, compiled shapes and host time, no model")
  parser.add_argument("--profile", type=int, default=0, metavar="CALLS",
                      help="trace CALLS decode calls twice, once with every slot busy and once "
                           "with at most 8 busy, and report their kernels per step "
                           "(`device_profile`); the traced calls run slower, so the batch "
                           "time of such a run is a diagnosis, not a result")
  parser.add_argument("--out", default="")
  if parser.parse_known_args(argv)[0].tiny:  # tiny defaults; flags given still win
    parser.set_defaults(preset="tiny", prompts=4, samples=2, prompt_min=8, prompt_max=24,
                        mean_new=12, max_new=40, num_slots=4, page_size=4, steps_per_call=4,
                        prefill_chunk=16, static_batch_prompts=4, static_batches=0,
                        memory_every=1)
  args = parser.parse_args(argv)
  if args.ab and args.compact_widths == []:
    parser.error("--ab compares against compaction: give --compact_widths a width or leave it out")
  if args.ab and args.profile:
    parser.error("--ab and --profile: trace one engine run at a time")
  return args


def add_engine_option_flags(parser: argparse.ArgumentParser) -> None:
  """The rollout engine's speed options (shared by rollout.py and rl_step.py), given to the
  Engine by `engine_options`."""
  parser.add_argument("--compact_widths", type=int, nargs="*", default=None,
                      help="Engine(compact_widths=...): decode calls with at most w busy slots "
                           "run w rows (the busy samples moved into the low slots); default "
                           "the engine's (engine.DEFAULT_COMPACT_WIDTHS), no value: off")
  parser.add_argument("--precompile", type=int, default=0, metavar="WORKERS",
                      help="before the run, compile every program the engine can call, "
                           "WORKERS at a time (Engine.precompile; 0: compile as met)")


def precompile(args, engine, clock, samplings, max_length: int,
               prompt_length: int | None) -> dict | None:
  """`--precompile`: `Engine.precompile(max_length, samplings, prompt_length=...)` ->
  {programs, workers, wall_s, compile_s_summed (the compile events' seconds added up over
  the threads)}; None without the flag."""
  if not args.precompile:
    return None
  before, start = clock.total, time.perf_counter()
  programs = engine.precompile(max_length, samplings, prompt_length=prompt_length,
                               workers=args.precompile)
  return {"programs": programs, "workers": args.precompile,
          "wall_s": time.perf_counter() - start, "compile_s_summed": clock.total - before}


def engine_options(args) -> dict:
  """The Engine keywords of `add_engine_option_flags`."""
  widths = None if args.compact_widths is None else tuple(args.compact_widths)
  return dict(compact_widths=widths)


def add_workload_flags(parser: argparse.ArgumentParser) -> None:
  """The RL workload's flags (shared by rollout.py, rl_step.py and rl_step_trl.py)."""
  parser.add_argument("--prompts", type=int, default=64, help="prompts in the draw")
  parser.add_argument("--samples", type=int, default=8, help="samples per prompt (a group)")
  parser.add_argument("--prompt_min", type=int, default=256)
  parser.add_argument("--prompt_max", type=int, default=1024)
  parser.add_argument("--mean_new", type=float, default=1024)
  parser.add_argument("--max_new", type=int, default=8192)
  parser.add_argument("--sigma", type=float, default=1.0, help="lognormal shape")
  parser.add_argument("--seed", type=int, default=0)


def workload(args, vocab: int) -> tuple[list[list[int]], np.ndarray]:
  """Prompts [P] (token lists) and response lengths [P, G] drawn in advance."""
  rng = np.random.default_rng(args.seed)
  prompts = [rng.integers(1, vocab, size=int(rng.integers(args.prompt_min, args.prompt_max + 1)))
             .tolist() for _ in range(args.prompts)]
  mu = np.log(args.mean_new) - args.sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
  lengths = np.clip(np.round(rng.lognormal(mu, args.sigma, (args.prompts, args.samples))), 1,
                    args.max_new).astype(np.int64)
  return prompts, lengths


class CompileClock:
  """Seconds jax spent compiling (backend compiles, from jax.monitoring) since `start`."""

  def __init__(self, jax):
    self.total = 0.0

    def listen(event, duration, **_):
      if "compile" in event and event.endswith("duration"):
        self.total += duration

    jax.monitoring.register_event_duration_secs_listener(listen)


def copy_bandwidth(jax, jnp, nbytes: int) -> float:
  """(bytes read + written) / median time of an elementwise bf16 pass over `nbytes`, bytes/s."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  add = jax.jit(lambda a: a + 1)
  add(x).block_until_ready()
  times = []
  for _ in range(20):
    t0 = time.perf_counter()
    add(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * x.size * 2 / statistics.median(times)


def engine_layout(args, config, attention: str) -> dict:
  """The Engine's attention, long_rows and min_table_pages for this run. One full table width
  for the whole run where the width costs little: with long rows split off (the XLA
  attention: only the cut widths compile)."""
  from kat_jax.sampling.engine import attention_plan  # pylint: disable=g-import-not-at-top
  attention, long_rows = attention_plan(attention, config, args.page_size)
  long_rows = long_rows if args.long_rows is None else args.long_rows
  full_width = -(-(args.prompt_max + args.max_new) // args.page_size)
  return dict(attention=attention, long_rows=long_rows,
              min_table_pages=full_width if long_rows else 8)


def run_engine(args, config, dparams, prompts, lengths, kv_per_token, clock,
               options: dict) -> tuple[dict, dict]:
  """One engine run of the draw with Engine `options` (`engine_options`) -> (its report,
  its completions {sample id: Completion})."""
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.engine import Engine, Request  # pylint: disable=g-import-not-at-top
  worst = args.num_slots * (args.prompt_max + args.max_new) // args.page_size + 2 * args.num_slots
  cap = int(args.kv_gib * 2**30 / (kv_per_token * args.page_size))
  num_pages = min(worst, cap) + 1
  engine = Engine(config, dparams, num_slots=args.num_slots, num_pages=num_pages,
                  page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                  prefill_chunks_per_call=args.prefill_chunks_per_call,
                  steps_per_call=args.steps_per_call,
                  **engine_layout(args, config, args.attention), **options)
  sampling = SamplingParams(temperature=1.0, vocab_limit=0)
  precompiled = precompile(args, engine, clock, (sampling,), args.prompt_max + args.max_new,
                           args.prompt_max)
  for i, prompt in enumerate(prompts):
    engine.submit(Request(prompt, lengths[i].tolist(), sampling=sampling,
                          num_samples=args.samples, rng=jax.random.key(i)))
  from kat_jax.progress import Progress  # pylint: disable=g-import-not-at-top
  compile_before = clock.total
  memory, rounds = [], 0
  total = int(lengths.sum())
  progress = Progress(f"engine {options} (compiles included)", total, unit="tokens")
  profiler = DecodeProfiler(engine, args.profile, args.out or "rollout.json")
  start = time.perf_counter()
  # Rounds that compiled nothing: their seconds inside and outside the decode call.
  rounds_s = {"decode_call_s": 0.0, "outside_decode_call_s": 0.0, "rounds": 0}
  while engine.busy:
    before, calls, compiled = engine.stats["slot_steps"], len(engine.decode_log), clock.total
    profiler.before_round()
    traced = profiler.tracing
    t0 = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - t0
    profiler.after_round()
    if clock.total == compiled and not traced:
      inside = sum(call[0] for call in list(engine.decode_log)[calls:])
      rounds_s["decode_call_s"] += inside
      rounds_s["outside_decode_call_s"] += seconds - inside
      rounds_s["rounds"] += 1
    progress.update(engine.stats["slot_steps"] - before)
    rounds += 1
    if rounds % args.memory_every == 0:
      memory.append(engine.memory())
  wall = time.perf_counter() - start
  progress.finish()
  completions = engine.run()
  compile_s = clock.total - compile_before
  generated = sum(len(c.tokens) for c in completions.values())
  assert generated == total and not any(c.error for c in completions.values()), "lost tokens"
  seconds = wall - compile_s
  stats = engine.stats
  log = np.asarray(engine.decode_log, np.float64).reshape(-1, 5)
  held = np.asarray([m["held_tokens"] for m in memory], np.float64)
  live = np.asarray([m["live_tokens"] for m in memory], np.float64)
  ok = live > 0
  result = {
      "generated_tokens": generated, "seconds": seconds, "compile_s": compile_s,
      "wall_s_with_compiles": wall, "tokens_per_s": generated / seconds,
      "num_slots": args.num_slots, "page_size": args.page_size, "num_pages": num_pages,
      "steps_per_call": args.steps_per_call, "attention": engine.attention,
      "long_rows": engine.long_rows, "split_calls": stats["split_calls"],
      "compact_widths": list(engine.compact_widths), "compact_calls": stats["compact_calls"],
      "compact_steps": stats["compact_steps"], "moved_samples": stats["moved_samples"],
      "precompile": precompiled,
      "decode_calls": stats["decode_calls"],
      "decode_steps": stats["decode_steps"], "prefill_chunks": stats["prefill_chunks"],
      "mean_slot_occupancy": stats["slot_steps"] / max(stats["decode_steps"] * args.num_slots,
                                                       1),
      "kv_held_over_live_mean": float((held[ok] / live[ok]).mean()) if ok.any() else None,
      "kv_held_over_live_max": float((held[ok] / live[ok]).max()) if ok.any() else None,
      "kv_held_tokens_max": float(held.max()) if held.size else 0.0,
      "kv_samples": int(held.size),
      "decode_s_with_compiles": float(log[:, 0].sum()),
      # Scheduler rounds without a compile or a trace: seconds in decode calls (dispatch to
      # records unpacked) and outside them (admission, prefill chunks, page reservation and
      # the call's inputs; the device idles unless a prefill chunk runs).
      "rounds_without_compile": rounds_s,
      "decode_log": log,
  }
  if args.profile:
    result["profile"] = profiler.windows
    result["profile_wall_s"] = profiler.wall_s
  return result, completions


def same_completions(want: dict, got: dict) -> dict:
  """How far two runs' completions {sample id: Completion} of one draw agree: samples with
  identical tokens, identical log-probs and identical versions, the largest |log-prob
  difference| over the tokens both runs share before they first differ, and the earliest
  token where a sample's tokens differ (None: none does)."""
  same_tokens = same_logprobs = same_versions = 0
  worst, first = 0.0, None
  for sid, w in want.items():
    g = got[sid]
    a, b = np.asarray(w.tokens), np.asarray(g.tokens)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    shared = int(differ[0]) if differ.size else n
    if differ.size or len(a) != len(b):
      first = shared if first is None else min(first, shared)
    else:
      same_tokens += 1
    same_logprobs += int(np.array_equal(w.logprobs, g.logprobs))
    same_versions += int(np.array_equal(w.versions, g.versions))
    if shared:
      worst = max(worst, float(np.max(np.abs(w.logprobs[:shared] - g.logprobs[:shared]))))
  return {"samples": len(want), "identical_tokens": same_tokens,
          "identical_logprobs": same_logprobs, "identical_versions": same_versions,
          "max_abs_logprob_diff_before_divergence": worst, "first_divergence_token": first}


class DecodeProfiler:
  """Traces `calls` decode calls of a running engine twice: the first window opens at a
  round whose previous decode call had every slot busy (after `skip` calls, so its programs
  are compiled), the second at one whose previous call had at most `tail_slots` busy.
  Each window's kernel summary (`device_profile.kernel_summary`, per decode step) lands in
  `windows[name]`; `wall_s` is the time spent in traced rounds and in starting and stopping
  traces (the traces stay beside `out_path`, in `<name>_traces/`). calls = 0: does
  nothing."""

  def __init__(self, engine, calls: int, out_path: str, skip: int = 8, tail_slots: int = 8):
    self.engine, self.calls, self.skip, self.tail_slots = engine, int(calls), skip, tail_slots
    self.trace_root = os.path.splitext(os.path.abspath(out_path))[0] + "_traces"
    self.windows: dict[str, dict] = {}
    self.wall_s = 0.0
    # (name, Window, decode calls, decode steps, perf_counter and busy slots at its start)
    self._open = None

  @property
  def tracing(self) -> bool:
    """Whether a trace window is open (this round is traced)."""
    return self._open is not None

  def _want(self) -> str | None:
    log = self.engine.decode_log
    if len(log) < self.skip:
      return None
    busy = log[-1][1]
    if "full" not in self.windows and busy == self.engine.num_slots:
      return "full"
    if "tail" not in self.windows and "full" in self.windows and busy <= self.tail_slots:
      return "tail"
    return None

  def before_round(self) -> None:
    if not self.calls or self._open is not None:
      return
    name = self._want()
    if name is None:
      return
    t0 = time.perf_counter()
    try:
      window = device_profile.Window(os.path.join(self.trace_root, name)).__enter__()
    except Exception as e:  # pylint: disable=broad-except  # a diagnosis must not end the run
      self._give_up(name, e)
      return
    stats = self.engine.stats
    self._open = (name, window, stats["decode_calls"], stats["decode_steps"], t0,
                  int(self.engine.decode_log[-1][1]))

  def after_round(self) -> None:
    if self._open is None:
      return
    name, window, calls0, steps0, t0, busy = self._open
    stats = self.engine.stats
    if stats["decode_calls"] - calls0 < self.calls and self.engine.busy:
      return
    self._open = None
    try:
      window.__exit__(None, None, None)
      events = device_profile.kernel_events(window.trace_dir)
    except Exception as e:  # pylint: disable=broad-except
      self._give_up(name, e)
      return
    finally:
      self.wall_s += time.perf_counter() - t0
    summary = device_profile.kernel_summary(events, max(stats["decode_steps"] - steps0, 1))
    summary["decode_calls"] = stats["decode_calls"] - calls0
    summary["busy_slots_at_start"] = busy
    self.windows[name] = summary
    print(device_profile.format_summary(f"profile {name}", summary), flush=True)

  def _give_up(self, name: str, error: Exception) -> None:
    """Records why window `name` failed and traces no more."""
    self.windows[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    self.calls = 0
    print(f"profile {name}: {self.windows[name]['error']} (no more traces)", flush=True)


# Buckets of active slots per decode call for `step_times` (upper bounds, inclusive).
ACTIVE_BUCKETS = (1, 4, 8, 32, 64, 96, 127, 128)


def _active_buckets(active: np.ndarray, num_slots: int):
  """(label "low-high", mask of the calls in it) for each `ACTIVE_BUCKETS` range of busy
  slots that holds a call; active [calls]."""
  low = 0
  for high in ACTIVE_BUCKETS:
    pick = (active > low) & (active <= min(high, num_slots))
    if pick.any():
      yield f"{low + 1}-{min(high, num_slots)}", pick
    low = high


def steps_by_active_slots(log: np.ndarray, num_slots: int) -> dict[str, int]:
  """Decode steps by the busy slots at the start of their call (`ACTIVE_BUCKETS` ranges,
  "low-high": steps) from `Engine.decode_log` [calls, 5]."""
  return {label: int(log[pick, 2].sum()) for label, pick in _active_buckets(log[:, 1],
                                                                             num_slots)}


def step_times(log: np.ndarray, num_slots: int, weight_bytes: int, kv_per_token: int,
               bandwidth: float) -> tuple[dict | None, list[dict]]:
  """The engine's decode calls -> (full-occupancy summary, one row per bucket of active slots).

  log [calls, 5]: seconds, active slots, steps run, live tokens at the start, prefill chunks
  since the previous call (`Engine.decode_log`). A call's step time is its seconds / steps;
  its floor reads the weights and its slots' live KV (mid-call) once per step at the copy
  `bandwidth`. Full occupancy: every slot busy, no prefill before the call. Calls that
  compiled a program are in the log too: medians keep them out of the figures.
  """
  ran = log[log[:, 2] > 0]
  per_step = ran[:, 0] / ran[:, 2]
  context = ran[:, 3] + ran[:, 1] * ran[:, 2] / 2
  floor = (weight_bytes + context * kv_per_token) / bandwidth
  full = (ran[:, 1] == num_slots) & (ran[:, 4] == 0)
  summary = None
  if full.any():
    summary = {"calls": int(full.sum()),
               "step_ms_median": float(np.median(per_step[full]) * 1e3),
               "context_tokens_median": float(np.median(context[full])),
               "floor_ms_median": float(np.median(floor[full]) * 1e3),
               "step_over_floor_median": float(np.median(per_step[full] / floor[full]))}
  rows = []
  for _, pick in _active_buckets(ran[:, 1], num_slots):
    rows.append({"active_slots": [int(ran[pick, 1].min()), int(ran[pick, 1].max())],
                 "calls": int(pick.sum()), "steps": int(ran[pick, 2].sum()),
                 "seconds": float(ran[pick, 0].sum()),
                 "step_ms_median": float(np.median(per_step[pick]) * 1e3),
                 "context_tokens_median": float(np.median(context[pick])),
                 "floor_ms_median": float(np.median(floor[pick]) * 1e3),
                 "step_over_floor_median": float(np.median(per_step[pick] / floor[pick]))})
  return summary, rows


def run_static(args, config, dparams, prompts, lengths, clock) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.progress import status  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import Sampler, SamplingParams  # pylint: disable=g-import-not-at-top
  sampler = Sampler(config, pad_id=0, prefill_chunk=args.prefill_chunk)
  sampling = SamplingParams(temperature=1.0)
  group = args.static_batch_prompts
  batches = [(i, min(i + group, len(prompts))) for i in range(0, len(prompts), group)]
  if args.static_batches:
    batches = batches[:args.static_batches]
  seconds = compile_s = 0.0
  generated = run_tokens = held = 0
  for b, (lo, hi) in enumerate(batches):
    steps = int(lengths[lo:hi].max())
    rounded = -(-steps // 256) * 256  # few compiled lengths; the loop still runs `steps`
    longest = max(len(p) for p in prompts[lo:hi])
    max_length = -(-longest // args.prefill_chunk) * args.prefill_chunk + rounded
    before = clock.total
    t0 = time.perf_counter()
    state = sampler.prefill(dparams, prompts[lo:hi], max_length=max_length)
    from kat_jax.sampling import fork  # pylint: disable=g-import-not-at-top
    state = fork(state, args.samples)
    result, _ = sampler.decode(dparams, state, jax.random.key(b), max_new_tokens=steps,
                               sampling=sampling)
    jax.block_until_ready(result.tokens)
    wall = time.perf_counter() - t0
    compile_s += clock.total - before
    seconds += wall - (clock.total - before)
    generated += int(lengths[lo:hi].sum())
    run_tokens += steps * (hi - lo) * args.samples
    held += (hi - lo) * args.samples * max_length
    status(f"static sampler: batch {b + 1}/{len(batches)}, {steps} steps, {wall:.1f}s")
  return {"batches_run": len(batches),
          "batches_total": -(-len(prompts) // group), "rows_per_batch": group * args.samples,
          "generated_tokens": generated, "decoded_row_tokens": run_tokens,
          "seconds": seconds, "compile_s": compile_s, "tokens_per_s": generated / seconds,
          "useful_fraction": generated / run_tokens,
          "kv_held_tokens_per_batch_mean": held / len(batches)}


@contextlib.contextmanager
def stand_in_device(on_decode: Callable[[int, int, int, int], None] | None = None):
  """While inside, a new `Engine` runs its host scheduler on a stand-in device (no model):
  each active slot generates token 1 with log-prob 0 per step until its budget ends.
  on_decode(rows, table width, cut width, steps some slot ran) is called per decode call."""
  from unittest import mock  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import paged  # pylint: disable=g-import-not-at-top

  def decode(params, cache, logits, table, positions, budget, counts, stops, choice, keys,
             long_rows, *, samplings, steps, short_pages):
    live = np.asarray(budget)[:, None] > np.arange(steps)[None, :]
    if on_decode is not None:
      on_decode(int(table.shape[0]), int(table.shape[1]), int(short_pages),
                int(live.any(axis=0).sum()))
    records = np.zeros(live.shape + (4,), np.float32)
    records[..., 0], records[..., 3] = 1.0, live
    return cache, logits, records

  fns = {"prefill": lambda params, cache, *a: (cache, None), "decode": decode,
         "copy": lambda cache, src, dst: cache, "set_row": lambda logits, row, i: logits,
         "move_rows": lambda logits, src, dst: logits}
  with mock.patch.object(paged, "jitted", lambda *a: fns), mock.patch.object(
      paged, "init_pages", lambda *a: {"k": [jax.numpy.zeros(1)], "v": []}):
    yield


def simulate(args) -> dict:
  """The engine's scheduling of the workload with a stand-in device (`stand_in_device`).
  Gives occupancy, decode calls,
  the distinct (rows, table width, cut width) decode shapes a real run compiles, decode
  steps by rows (`--compact_widths`), KV held / live, and the host's seconds per decode
  call. `--attention` other than auto lays the engine out for that backend (auto: xla)."""
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.model import get_preset  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling.engine import Engine, Request  # pylint: disable=g-import-not-at-top

  config = get_preset("tiny", num_layers=1, max_position_embeddings=1 << 16)
  shapes, steps_by_rows = set(), collections.Counter()

  def on_decode(rows, width, short, steps):
    shapes.add((rows, width, short))
    steps_by_rows[rows] += steps

  prompts, lengths = workload(args, config.vocab_size)
  with stand_in_device(on_decode):
    num_pages = args.num_slots * (args.prompt_max + args.max_new) // args.page_size + 1
    engine = Engine(config, _stand_in_params(), num_slots=args.num_slots, num_pages=num_pages,
                    page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                    prefill_chunks_per_call=args.prefill_chunks_per_call,
                    steps_per_call=args.steps_per_call,
                    **engine_layout(args, config, "xla" if args.attention == "auto"
                                    else args.attention), **engine_options(args))
    for i, prompt in enumerate(prompts):
      engine.submit(Request(prompt, lengths[i].tolist(), sampling=SamplingParams(1.0),
                            num_samples=args.samples, rng=jax.random.key(0)))
    memory, rounds, start = [], 0, time.perf_counter()
    while engine.busy:
      engine.step()
      rounds += 1
      if rounds % args.memory_every == 0:
        memory.append(engine.memory())
    host_s = time.perf_counter() - start
    done = engine.run()
  stats = engine.stats
  held = np.asarray([m["held_tokens"] for m in memory], np.float64)
  live = np.asarray([m["live_tokens"] for m in memory], np.float64)
  held, live = held[live > 0], live[live > 0]
  report = {"simulated": True, "generated_tokens": sum(len(c.tokens) for c in done.values()),
            "drawn_tokens": int(lengths.sum()), "decode_calls": stats["decode_calls"],
            "decode_steps": stats["decode_steps"], "prefill_chunks": stats["prefill_chunks"],
            "longest_sample": int(lengths.max()),
            "mean_slot_occupancy": stats["slot_steps"] / (stats["decode_steps"] *
                                                          args.num_slots),
            "decode_shapes": sorted(shapes), "split_calls": stats["split_calls"],
            "steps_by_rows": {str(rows): n for rows, n in sorted(steps_by_rows.items())},
            "moved_samples": stats["moved_samples"],
            "kv_held_over_live_mean": float((held / live).mean()),
            "kv_held_over_live_max": float((held / live).max()),
            "host_ms_per_decode_call": host_s / stats["decode_calls"] * 1e3,
            "steps_by_active_slots": steps_by_active_slots(
                np.asarray(engine.decode_log, np.float64).reshape(-1, 5), args.num_slots)}
  print(json.dumps(report, indent=1))
  return report


def _stand_in_params():
  """An empty DecodeParams (the simulated device never reads weights)."""
  from kat_jax.sampling import DecodeParams  # pylint: disable=g-import-not-at-top
  return DecodeParams(embed=None, head=None, final_norm=None, layers=[])


def main(argv=None) -> dict:
  args = _parse(argv)
  if args.simulate:
    report = simulate(args)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(dict(report, command=" ".join(["python"] + sys.argv)), f, indent=2)
    return report
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from kat_jax.model import get_preset, init_params  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import prepare_params  # pylint: disable=g-import-not-at-top

  clock = CompileClock(jax)
  dtype = "float32" if args.tiny else "bfloat16"
  overrides = dict(num_layers=1) if args.tiny else {}
  config = get_preset(args.preset, dtype=dtype, param_dtype=dtype, **overrides)
  params = init_params(config, jax.random.key(0))
  dparams = prepare_params(params, config)
  del params
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(dparams)
                     if x is not dparams.head or dparams.head is not dparams.embed)
  item = jnp.dtype(config.compute_dtype).itemsize
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * item
  bandwidth = copy_bandwidth(jax, jnp, (1 << 30) if not args.tiny else (1 << 22))
  prompts, lengths = workload(args, config.vocab_size)
  print(f"{args.preset}: {len(prompts)} prompts x {args.samples}, {int(lengths.sum())} tokens "
        f"to generate (mean {lengths.mean():.0f}, max {lengths.max()}); copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s", flush=True)
  report = {
      "device": jax.devices()[0].device_kind,
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "preset": args.preset, "dtype": dtype,
      "workload": {"prompts": args.prompts, "samples": args.samples,
                   "prompt_tokens": [args.prompt_min, args.prompt_max],
                   "response_lengths": {"lognormal_mean": args.mean_new, "sigma": args.sigma,
                                        "max": args.max_new, "drawn_mean": float(lengths.mean()),
                                        "drawn_max": int(lengths.max())},
                   "sampling": "temperature 1, no stop ids (each sample stops at its length)"},
      "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token,
      "copy_bandwidth_bytes_per_s": bandwidth, "engine": None, "static": None,
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
  }
  first = None
  for name, options in ab_variants(args) if args.ab else [("engine", engine_options(args))]:
    try:
      result, completions = run_engine(args, config, dparams, prompts, lengths, kv_per_token,
                                       clock, options)
    except Exception as e:  # pylint: disable=broad-except
      if not args.ab or first is None:
        raise
      # A later --ab run that fails (e.g. an option XLA cannot compile here) is recorded;
      # the runs after it still go.
      report["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
      print(f"{name}: {report['variants'][name]['error']}", flush=True)
      gc.collect()
      continue
    result["full_occupancy"], result["step_ms_by_active_slots"] = step_times(
        result.pop("decode_log"), args.num_slots, weight_bytes, kv_per_token, bandwidth)
    if first is None:
      first, report["engine"] = completions, result
    else:
      result["vs_first"] = same_completions(first, completions)
    if args.ab:
      report.setdefault("variants", {})[name] = result
      _print_variants(report["variants"])
      write_report(args.out, report)  # kept if a later run is cut off by a time limit
    del completions
    gc.collect()  # the previous engine's page pool goes before the next one's
  engine = report["engine"]
  if not args.skip_static:
    write_report(args.out, report)  # kept if the static run is cut off by a time limit
    report["static"] = run_static(args, config, dparams, prompts, lengths, clock)
    report["engine_over_static_tokens_per_s"] = (engine["tokens_per_s"]
                                                 / report["static"]["tokens_per_s"])
  _print_table(report)
  write_report(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  return report


def ab_variants(args) -> list[tuple[str, dict]]:
  """--ab's engine runs, `--ab_runs` of them: (name, `engine_options`) with tail compaction
  off (base) and on (compact: --compact_widths, or the engine's default widths)."""
  compact = None if args.compact_widths is None else tuple(args.compact_widths)
  runs = {"base": dict(compact_widths=()), "compact": dict(compact_widths=compact)}
  return [(name, runs[name]) for name in args.ab_runs]


def _print_variants(variants: dict) -> None:
  """One line per --ab run: tokens/s, batch and compile seconds, step ms by busy slots, and
  how many samples' tokens / log-probs equal the first run's."""
  print(f"{'run':16s} {'tokens/s':>9s} {'s':>6s} {'compile':>7s}  step ms by busy slots; "
        f"samples equal to the first run's (tokens, log-probs)")
  for name, e in variants.items():
    if "error" in e:
      print(f"{name:16s} {e['error'][:100]}")
      continue
    steps = " ".join(f"{r['active_slots'][0]}-{r['active_slots'][1]}:{r['step_ms_median']:.2f}"
                     for r in e["step_ms_by_active_slots"])
    same = e.get("vs_first")
    same = f"{same['identical_tokens']}, {same['identical_logprobs']} of {same['samples']}" \
        if same else "-"
    print(f"{name:16s} {e['tokens_per_s']:9.0f} {e['seconds']:6.1f} {e['compile_s']:7.1f}  "
          f"{steps}; {same}", flush=True)


def write_report(path: str, report: dict) -> None:
  """Writes the report as JSON to `path` ("" = nowhere)."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=float)


def _print_table(report: dict) -> None:
  e, s = report["engine"], report["static"]
  rows = [("generated tokens/s", f"{e['tokens_per_s']:.0f}",
           f"{s['tokens_per_s']:.0f}" if s else "-"),
          ("seconds (compiles excluded)", f"{e['seconds']:.1f}",
           f"{s['seconds']:.1f} ({s['batches_run']}/{s['batches_total']} batches)" if s else "-"),
          ("compile seconds", f"{e['compile_s']:.1f}", f"{s['compile_s']:.1f}" if s else "-"),
          ("mean slot occupancy", f"{e['mean_slot_occupancy']:.3f}",
           f"{s['useful_fraction']:.3f} (useful rows)" if s else "-"),
          ("KV held / live (mean, max)",
           f"{e['kv_held_over_live_mean'] or 0:.3f}, {e['kv_held_over_live_max'] or 0:.3f}", "-")]
  r = e["rounds_without_compile"]
  rows.append(("s in / out of calls (no compile)",
               f"{r['decode_call_s']:.1f} / {r['outside_decode_call_s']:.1f} ({r['rounds']})", "-"))
  full = e.get("full_occupancy")
  if full:
    rows.append(("full-occupancy step ms (floor)",
                 f"{full['step_ms_median']:.2f} ({full['floor_ms_median']:.2f}, "
                 f"{full['step_over_floor_median']:.2f}x)", "-"))
  print(f"{'':34s} {'engine':>24s} {'static':>28s}")
  for name, a, b in rows:
    print(f"{name:34s} {a:>24s} {b:>28s}")
  if s:
    print(f"engine / static tokens/s: {report['engine_over_static_tokens_per_s']:.2f}x")
  print(f"engine decode calls by active slots: {'calls':>6} {'steps':>6} {'s':>7} "
        f"{'step ms':>8} {'floor ms':>8} {'ratio':>6}")
  for r in e["step_ms_by_active_slots"]:
    low, high = r["active_slots"]
    print(f"{f'{low}-{high}':>35} {r['calls']:>6} {r['steps']:>6} {r['seconds']:>7.1f} "
          f"{r['step_ms_median']:>8.2f} {r['floor_ms_median']:>8.2f} "
          f"{r['step_over_floor_median']:>6.2f}")


if __name__ == "__main__":
  main()
