"""Fused decode kernels alone: achieved memory bandwidth of each matvec shape of a preset and
of single-token attention, against the device copy bandwidth and XLA's ops for the same math.

  PYTHONPATH=$PWD python3 benchmarks/decode_kernels.py --out $OUT/decode_kernels.json

Each row: device time per op, bytes it must read / time, and the same function through XLA
(`matvec_reference` / `decode_attention_reference`). One jitted call applies the op to
`--copies` different weight matrices (caches) in turn, as a decode step walks its layers (no
weight is re-read from L2); the time is the GPU busy time of an XProf trace of a few such
calls divided by the ops run (no dispatch, no launch gaps: what the op costs inside a
CUDA-graph-replayed decode step).
Times each of `--variants` (fused_matvec tilings) on each matvec, and attention at each
`--cache_len` with its default tiles and each `--block_s` x `--attention_warps`. Off a GPU the
kernels run in Pallas interpret mode (a smoke test; the times mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from kat_jax.kernels.decode import (decode_attention, decode_attention_reference, fused_matvec,
                                    matvec_reference)
from kat_jax.model import get_preset
from kat_jax.model.layers import rope_cos_sin
from kat_jax.train.profiling import find_trace_file, summarize_trace


# One block per program, then persistent grids (`programs`: 264 / 396 are 2 / 3 per SM of a
# 132-SM H100 / H200, the fused step's gate/up and down settings there), then the tiles of
# q/k/v, o and gate/up with 512-column loads and down's with 1024 (max_chunk; 1024 does not
# divide K = 8960 or 1536: the last chunk overlaps, masked).
DEFAULT_VARIANTS = ("block_n=1,num_warps=4", "block_n=4,num_warps=4", "block_n=8,num_warps=4",
                    "block_n=4,num_warps=8", "block_n=8,num_warps=8",
                    "block_n=1,num_warps=4,programs=264", "block_n=2,num_warps=4,programs=396",
                    "block_n=1,num_warps=4,max_chunk=512", "block_n=8,num_warps=4,max_chunk=512",
                    "block_n=2,num_warps=4,programs=396,max_chunk=512",
                    "block_n=1,num_warps=4,programs=264,max_chunk=1024")


def _variant(text: str) -> dict:
  """'block_n=8,num_warps=4' -> {'block_n': 8, 'num_warps': 4} (fused_matvec keywords)."""
  setting = {}
  for pair in text.split(","):
    name, _, value = pair.partition("=")
    setting[name] = int(value)
  return setting


def _fastest(kernels: list[dict]) -> dict | None:
  """The timed entry with the lowest time (entries that failed carry no 'us')."""
  return min((k for k in kernels if "us" in k), key=lambda k: k["us"], default=None)


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def median_us(fn, *args, iters: int = 50) -> float:
  """Wall time per call (host-synchronised), median."""
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e6 * statistics.median(times)


def device_us(fn, *args, ops: int, iters: int = 5) -> float:
  """GPU busy time per op: an XProf trace of `iters` calls of `fn` (each running `ops` ops)."""
  if jax.default_backend() != "gpu":
    return median_us(fn, *args, iters=iters) / ops
  jax.block_until_ready(fn(*args))
  trace_dir = tempfile.mkdtemp(prefix="decode_kernels_")
  with jax.profiler.trace(trace_dir):
    for _ in range(iters):
      jax.block_until_ready(fn(*args))
  summary = summarize_trace(find_trace_file(trace_dir))
  return 1e3 * summary["busy_ms"] / (iters * ops)


def copy_bandwidth() -> float:
  x = jnp.ones((1 << 29,), jnp.bfloat16)  # 1 GiB
  us = device_us(jax.jit(lambda x: x + 1), x, ops=1)
  return 2 * x.nbytes / (us * 1e-6)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="qwen2.5-1.5b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--variants", default=";".join(DEFAULT_VARIANTS),
                      help="matvec tilings to time, ';'-separated, each 'name=value,...' of "
                           "fused_matvec keywords (block_n, num_warps, programs, max_chunk)")
  parser.add_argument("--cache_len", default="256", help="attention cache lengths")
  parser.add_argument("--block_s", default="16,32,64,128", help="attention slots per program")
  parser.add_argument("--attention_warps", default="2,4")
  parser.add_argument("--copies", type=int, default=16)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  config = get_preset(args.preset)
  dt = jnp.bfloat16
  d, f, hq, hkv, hd = (config.hidden_size, config.intermediate_size, config.num_heads,
                       config.num_kv_heads, config.head_dim)
  b, copies = args.batch, args.copies
  interpret = jax.default_backend() != "gpu"
  bandwidth = copy_bandwidth()
  print(f"{jax.devices()[0].device_kind}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  rand = lambda shape, s=1.0: (s * jax.random.normal(next(keys), shape)).astype(dt)
  shapes = {  # name: (K, N rows, kwargs)
      "qkv": (d, (hq + 2 * hkv) * hd, dict(norm_scale=rand((d,)), bias=rand(((hq + 2 * hkv) * hd,)))),
      "o": (hq * hd, d, dict(residual=rand((b, d)))),
      "gate_up": (d, 2 * f, dict(norm_scale=rand((d,)), swiglu=True)),
      "down": (f, d, dict(residual=rand((b, d)))),
  }
  rows = []
  for name, (k_size, n_rows, kwargs) in shapes.items():
    x = rand((b, k_size))
    ws = [rand((n_rows, k_size), k_size**-0.5) for _ in range(copies)]
    w = ws[0]
    nbytes = w.nbytes + x.nbytes
    each = lambda op: jax.jit(lambda x, ws: [op(x, w) for w in ws])
    xla_us = device_us(each(lambda x, w, kw=kwargs: matvec_reference(x, w, **kw)), x, ws,
                       ops=copies)
    row = dict(name=name, K=k_size, N=n_rows, weight_bytes=int(w.nbytes), xla_us=xla_us,
               xla_fraction_of_copy=nbytes / (xla_us * 1e-6) / bandwidth, kernels=[])
    for variant in args.variants.split(";"):
      setting = _variant(variant)
      if (n_rows // 2 if kwargs.get("swiglu") else n_rows) % setting.get("block_n", 8):
        continue  # the tile does not divide this product's outputs
      try:
        fn = each(lambda x, w, kw=kwargs, st=setting: fused_matvec(
            x, w, interpret=interpret, **st, **kw))
        us = device_us(fn, x, ws, ops=copies)
        row["kernels"].append(dict(setting, us=us,
                                   fraction_of_copy=nbytes / (us * 1e-6) / bandwidth))
      except Exception as e:  # pylint: disable=broad-except
        row["kernels"].append(dict(setting, error=str(e)[:200]))
    best = row["best"] = _fastest(row["kernels"])
    print(f"{name:8} K={k_size:5} N={n_rows:6} {w.nbytes / 1e6:6.1f} MB  XLA {xla_us:7.1f} us "
          f"({row['xla_fraction_of_copy']:.0%})  best kernel "
          + (f"{best['us']:7.1f} us ({best['fraction_of_copy']:.0%}) "
             + ",".join(f"{k}={v}" for k, v in best.items() if k not in ("us", "fraction_of_copy"))
             if best else "none ran"))
    rows.append(row)

  attention = []
  for s in _ints(args.cache_len):
    qkv = rand((b, (hq + 2 * hkv) * hd))
    caches = [(rand((b, s, hkv, hd)), rand((b, s, hkv, hd))) for _ in range(copies)]
    valid = jnp.ones((b, s), bool)
    cos, sin = rope_cos_sin(jnp.arange(s)[None], hd, config.rope_theta, dt)
    cos, sin = cos[0, :, 0], sin[0, :, 0]
    positions = jnp.full((b,), s - 1, jnp.int32)
    end = jnp.int32(s - 1)

    def walk(op, qkv=qkv, cos=cos, sin=sin, positions=positions, valid=valid, end=end):
      return jax.jit(lambda caches: [
          op(qkv, cos, sin, positions, kc, vc, valid, end, num_q_heads=hq)[0]
          for kc, vc in caches])

    row = dict(cache_len=s, cache_bytes=int(caches[0][0].nbytes * 2),
               xla_us=device_us(walk(decode_attention_reference), caches, ops=copies),
               kernels=[])
    # (None, None): decode_attention's defaults
    tiles = [dict(block_s=None, num_warps=None)] + [
        dict(block_s=bs, num_warps=w)
        for bs, w in itertools.product(_ints(args.block_s), _ints(args.attention_warps))]
    for tile in tiles:
      op = functools.partial(decode_attention, **tile, interpret=interpret)
      try:
        row["kernels"].append(dict(tile, us=device_us(walk(op), caches, ops=copies)))
      except Exception as e:  # pylint: disable=broad-except
        row["kernels"].append(dict(tile, error=str(e)[:200]))
    row["best"] = _fastest(row["kernels"])
    print(f"attention (cache {s}): XLA {row['xla_us']:.1f} us; "
          + ", ".join(f"{k.get('us', float('nan')):.1f} us "
                      + ",".join(f"{n}={v}" for n, v in k.items() if n not in ("us", "error"))
                      for k in row["kernels"]))
    attention.append(row)
  report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                python=platform.python_version(), command=" ".join(sys.argv),
                preset=args.preset, batch=b, copy_bandwidth_bytes_per_s=bandwidth,
                matvec=rows, attention=attention,
                copies=copies)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
      json.dump(report, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
