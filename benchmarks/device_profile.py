"""Where a GPU program's time goes: its kernels, summed from a `jax.profiler` trace.

  with Window(trace_dir):          # jax.profiler.start_trace / stop_trace
    ... run N steps ...
  summary = kernel_summary(kernel_events(trace_dir), steps=N)

`kernel_events` reads the trace's GPU planes (their `Stream` lines: one event per kernel or
copy, as CUPTI recorded it) with `jax.profiler.ProfileData`, so no TensorFlow or TensorBoard is
needed. `kernel_summary` turns the events into per-step figures: the span from the first
kernel's start to the last one's end, the busy time (summed kernel durations), the idle gaps
between them (span - busy: launch latency, host waits), and the time by kind of kernel
(attention kernel, matrix multiply, copy, other) and by kernel name.
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Iterable, NamedTuple

# Kernel-name pieces of each kind, tried in this order (names are lower-cased first).
KINDS = (("attention", ("paged_decode_attention", "tree_attention", "attention")),
         ("copy", ("memcpy", "memset")),
         ("matmul", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "wgmma", "matmul")))


class KernelEvent(NamedTuple):
  line: str  # the stream it ran on
  name: str
  start_ns: float
  duration_ns: float


def kernel_events(trace_dir: str) -> list[KernelEvent]:
  """The kernels and copies on every GPU stream of the newest trace under `trace_dir`
  (empty when the trace has no GPU plane, e.g. on CPU)."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  events = []
  for plane in ProfileData.from_file(files[-1]).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue  # derived lines (XLA Modules, XLA Ops) repeat the same time
      events += [KernelEvent(line.name, e.name, float(e.start_ns), float(e.duration_ns))
                 for e in line.events]
  return events


def kind_of(name: str) -> str:
  """'attention', 'copy', 'matmul' or 'other' from a kernel's name."""
  lowered = name.lower()
  for kind, pieces in KINDS:
    if any(p in lowered for p in pieces):
      return kind
  return "other"


def kernel_summary(events: Iterable[KernelEvent], steps: int, top: int = 20) -> dict:
  """Per-step figures of the kernels run over `steps` steps (ms; counts per step).

  span: first start to last end; busy: summed durations (kernels on concurrent streams
  count each); gaps: span - busy when positive (the device waited: launches, host work).
  """
  events = list(events)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if not events:
    return {"steps": steps, "kernels": 0, "note": "no GPU kernel in the trace"}
  first = min(e.start_ns for e in events)
  last = max(e.start_ns + e.duration_ns for e in events)
  busy = sum(e.duration_ns for e in events)
  by_kind = collections.Counter()
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    by_kind[kind_of(e.name)] += e.duration_ns
    by_name[e.name][0] += 1
    by_name[e.name][1] += e.duration_ns
  per_step = lambda ns: ns / steps / 1e6
  names = sorted(by_name.items(), key=lambda item: -item[1][1])
  return {
      "steps": steps,
      "kernels_per_step": len(events) / steps,
      "span_ms_per_step": per_step(last - first),
      "busy_ms_per_step": per_step(busy),
      "gap_ms_per_step": per_step(max(last - first - busy, 0.0)),
      "ms_per_step_by_kind": {k: per_step(v) for k, v in sorted(by_kind.items())},
      "top_kernels": [{"name": name[:120], "kind": kind_of(name), "count_per_step": n / steps,
                       "ms_per_step": per_step(ns)} for name, (n, ns) in names[:top]],
  }


class Window:
  """A `jax.profiler` trace into `trace_dir` while the block runs."""

  def __init__(self, trace_dir: str):
    self.trace_dir = trace_dir

  def __enter__(self) -> "Window":
    import jax  # pylint: disable=g-import-not-at-top
    os.makedirs(self.trace_dir, exist_ok=True)
    jax.profiler.start_trace(self.trace_dir)
    return self

  def __exit__(self, *exc) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.profiler.stop_trace()


def format_summary(title: str, summary: dict) -> str:
  """A few printable lines of `kernel_summary`."""
  if not summary.get("kernels_per_step"):
    return f"{title}: {summary.get('note', 'no kernels')}"
  kinds = ", ".join(f"{k} {v:.3f}" for k, v in summary["ms_per_step_by_kind"].items())
  lines = [f"{title}: per step {summary['span_ms_per_step']:.3f} ms span, "
           f"{summary['busy_ms_per_step']:.3f} busy, {summary['gap_ms_per_step']:.3f} gaps, "
           f"{summary['kernels_per_step']:.0f} kernels; by kind (ms): {kinds}"]
  lines += [f"  {k['ms_per_step']:8.3f} ms  x{k['count_per_step']:<6.1f} {k['kind']:9} {k['name']}"
            for k in summary["top_kernels"][:10]]
  return "\n".join(lines)
