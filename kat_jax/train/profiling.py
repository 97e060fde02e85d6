"""Where a step's time goes: record an XProf trace and summarise it without TensorBoard.

  with jax.profiler.trace(trace_dir):
    ...  # a few steps
  summary = summarize_trace(find_trace_file(trace_dir))

The summary reads the accelerator's plane (`/device:GPU:0`, `/device:TPU:0`) when the trace
has one, else the host CPU's XLA thunks, and reports: the span from the first to the last
op, the busy time (union of op intervals, so overlapping streams are not double counted), the
busy fraction, and the ops that took the most time, grouped by kernel name, with a coarse
category (matmul / attention kernel / collective / copy / other fusion).
"""

from __future__ import annotations

import glob
import os
import re
from collections import defaultdict
from typing import Any

_CATEGORIES = (
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|dot|matmul|convolution", re.I)),
    ("attention kernel", re.compile(r"tree_attention|flash|fmha|cudnn|attention|_fwd|_bwd", re.I)),
    ("collective", re.compile(r"all-reduce|all_reduce|all-gather|reduce-scatter|nccl|"
                              r"collective|all-to-all", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|dynamic-update-slice|transpose", re.I)),
)


def find_trace_file(trace_dir: str) -> str:
  """The newest `*.xplane.pb` that `jax.profiler.trace(trace_dir)` wrote."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}; was jax.profiler.trace used?")
  return max(files, key=os.path.getmtime)


def op_category(name: str) -> str:
  """Coarse category of a kernel / HLO op name."""
  for category, pattern in _CATEGORIES:
    if pattern.search(name):
      return category
  return "other fusion"


def _union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def _op_events(profile) -> tuple[str, list[tuple[str, float, float]]]:
  """(plane name, [(op name, start ns, end ns)]) of the accelerator, else the host's XLA ops."""
  planes = list(profile.planes)
  device = [p for p in planes if re.match(r"/device:(GPU|TPU):0$", p.name)]
  events = []
  if device:
    plane = device[0]
    for line in plane.lines:
      # GPU: kernels on "Stream #N" lines; TPU: "XLA Ops". Module/step lines would double count.
      if not (line.name.startswith("Stream") or line.name == "XLA Ops"):
        continue
      for e in line.events:
        events.append((e.name, e.start_ns, e.end_ns))
    return plane.name, events
  for plane in planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats and e.duration_ns > 0:
          events.append((str(stats["hlo_op"]), e.start_ns, e.end_ns))
    return plane.name, events
  return "", events


def summarize_trace(path: str, top: int = 20) -> dict[str, Any]:
  """Busy time, busy fraction and the costliest ops of one `.xplane.pb` trace."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  plane, events = _op_events(ProfileData.from_file(path))
  if not events:
    raise ValueError(f"{path}: no device or XLA op events in the trace")
  span = max(e for _, _, e in events) - min(s for _, s, _ in events)
  busy = _union_length([(s, e) for _, s, e in events])
  by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
  by_category: dict[str, float] = defaultdict(float)
  for name, start, end in events:
    by_name[name][0] += end - start
    by_name[name][1] += 1
    by_category[op_category(name)] += end - start
  total = sum(by_category.values())
  ops = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "plane": plane, "events": len(events), "span_ms": span / 1e6, "busy_ms": busy / 1e6,
      "busy_fraction": busy / span if span else 1.0,
      "categories": {k: {"ms": v / 1e6, "share": v / total}
                     for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"name": n[:120], "ms": t / 1e6, "count": c, "share": t / total,
                   "category": op_category(n)} for n, (t, c) in ops],
  }


def format_summary(summary: dict[str, Any], top: int = 10) -> str:
  """A short table of a `summarize_trace` result."""
  lines = [f"{summary['plane']}: busy {summary['busy_ms']:.1f} of {summary['span_ms']:.1f} ms "
           f"({summary['busy_fraction']:.1%}), {summary['events']} ops"]
  for name, c in summary["categories"].items():
    lines.append(f"  {name:>16} {c['ms']:9.2f} ms {c['share']:6.1%}")
  for op in summary["top_ops"][:top]:
    lines.append(f"  {op['ms']:9.2f} ms {op['share']:6.1%} x{op['count']:<4} {op['name'][:70]}")
  return "\n".join(lines)
