"""Paged decode attention: each backend's time at engine-like shapes against its bandwidth floor.

  PYTHONPATH=$PWD python3 benchmarks/paged_attention.py --out $OUT/paged_attention.json
  PYTHONPATH=$PWD python3 benchmarks/paged_attention.py --tiny      # CPU smoke test

One decode step's attention for one layer: `batch` rows with ragged lengths drawn uniformly
from [--min_len, --max_len], their pages scattered over the pool in random order. The floor is
the live KV bytes (K and V of every row's keys) / the device copy bandwidth measured in the
same run (bytes read + written by `x + 1` on 1 GiB). A time is the mean over `--iters` calls
issued back to back (asynchronous dispatch keeps the device busy), the best of 3 such runs.
`--tail N` keeps only N rows busy (at --max_len; the others idle), as at the end of an engine's
batch, where the Mosaic GPU grid still launches (empty) programs for the idle rows.
`--sweep` also times Mosaic GPU tilings (block_tokens x stages x split_tokens) at each shape.
Off a GPU the Pallas kernels run in their interpreters (a smoke test; the times mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.kernels.paged_attention import paged_decode_attention_reference
from kat_jax.kernels.paged_attention_mgpu import default_tiling, paged_decode_attention_mgpu
from kat_jax.kernels.paged_attention_tpu import paged_decode_attention_tpu

MODELS = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128)}  # Hq, Hkv, D


def mean_ms(fn, args, iters: int) -> float:
  """Mean time per call of `iters` back-to-back calls, best of 3 runs."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / iters)
  return best * 1e3


def copy_bandwidth(nbytes: int, iters: int) -> float:
  """Bytes read + written per second by `x + 1` over an `nbytes` bf16 array."""
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  ms = mean_ms(jax.jit(lambda x: x + 1), (x,), iters)
  return 2 * x.nbytes / (ms * 1e-3)


def make_inputs(seed: int, batch: int, heads: tuple[int, int, int], page_size: int,
                min_len: int, max_len: int, dtype=jnp.bfloat16, tail: int = 0):
  """q [B, Hq, D], pools [Hkv, P, page_size, D] holding exactly the rows' pages in random
  order, page_table [B, max_len / page_size] (entries past a row's pages: 0), lengths [B]
  uniform in [min_len, max_len]; tail > 0: only the first `tail` rows are busy, at
  max_len, the others idle (length 0), as an engine's slots at the end of a batch."""
  num_q_heads, num_kv_heads, head_dim = heads
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, max_len + 1, batch).astype(np.int32)
  if tail:
    lengths = np.where(np.arange(batch) < tail, max_len, 0).astype(np.int32)
  used = -(-lengths // page_size)
  max_pages = -(-max_len // page_size)
  num_pages = int(used.sum())
  order = rng.permutation(num_pages)
  table = np.zeros((batch, max_pages), np.int32)
  offsets = np.concatenate([[0], np.cumsum(used)])
  for b in range(batch):
    table[b, :used[b]] = order[offsets[b]:offsets[b + 1]]
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  q = jax.random.normal(keys[0], (batch, num_q_heads, head_dim), dtype)
  k = jax.random.normal(keys[1], shape, dtype)
  v = jax.random.normal(keys[2], shape, dtype)
  return q, k, v, jnp.asarray(table), jnp.asarray(lengths)


def backends(on_gpu: bool) -> dict:
  """name -> jitted function of (q, k_pages, v_pages, page_table, lengths)."""
  fns = {"xla": jax.jit(paged_decode_attention_reference),
         "mosaic_gpu": jax.jit(lambda *a: paged_decode_attention_mgpu(
             *a, interpret=not on_gpu))}
  if not on_gpu:
    fns["pallas_tpu"] = jax.jit(lambda *a: paged_decode_attention_tpu(*a, interpret=True))
  return fns


def sweep_variants(batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                   page_size: int) -> list[dict]:
  """Mosaic GPU tilings around the default: block_tokens x stages x split_tokens, those whose
  query + K/V stage buffers (bf16) fit one SM's 227 KiB of shared memory."""
  _, default_split = default_tiling(batch, num_kv_heads, max_len, page_size)
  variants = []
  for block, stages, split_scale in itertools.product((64, 128), (2, 3, 4), (0.5, 1, 2)):
    smem = 2 * 64 * head_dim + 2 * 2 * stages * block * head_dim
    if block % page_size or smem > 220 * 1024:
      continue
    split = max(block, int(default_split * split_scale) // block * block)
    variants.append(dict(block_tokens=block, stages=stages, split_tokens=split))
  return variants


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--batches", default="64,128,256")
  parser.add_argument("--page_sizes", default="16,32,64")
  parser.add_argument("--min_len", type=int, default=256)
  parser.add_argument("--max_len", type=int, default=8192)
  parser.add_argument("--tail", type=int, default=0,
                      help="only this many rows busy, at --max_len; the others idle (the end "
                           "of an engine's batch)")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--sweep", action="store_true", help="also time Mosaic GPU tilings")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke test: 1 model, batch 4, lengths 8..100, page size 16")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  models = args.models.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  page_sizes = [int(p) for p in args.page_sizes.split(",")]
  min_len, max_len, iters, copy_bytes = args.min_len, args.max_len, args.iters, 1 << 30
  if args.tiny:
    models, batches, page_sizes = models[:1], [4], [16]
    min_len, max_len, iters, copy_bytes = 8, 100, 2, 1 << 24
  bandwidth = copy_bandwidth(copy_bytes, iters)
  device = jax.devices()[0].device_kind
  print(f"{device}: copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
  fns = backends(on_gpu)
  rows = []
  shapes = list(itertools.product(models, batches, page_sizes))
  start = time.perf_counter()
  for done, (model, batch, page_size) in enumerate(shapes):
    heads = MODELS[model]
    inputs = make_inputs(done, batch, heads, page_size, min_len, max_len, tail=args.tail)
    lengths = np.asarray(inputs[4])
    kv_bytes = 2 * int(lengths.sum()) * heads[1] * heads[2] * inputs[1].dtype.itemsize
    row = dict(model=model, batch=batch, page_size=page_size,
               mean_len=float(lengths.mean()), kv_bytes=kv_bytes,
               floor_ms=kv_bytes / bandwidth * 1e3, ms={})
    want = np.asarray(fns["xla"](*inputs), np.float32)
    for name, fn in fns.items():
      try:
        got = np.asarray(fn(*inputs), np.float32)
        row[f"{name}_max_abs_err_vs_xla"] = float(np.max(np.abs(got - want)))
        row["ms"][name] = mean_ms(fn, inputs, iters)
      except Exception as e:  # pylint: disable=broad-except  # record it, time the others
        row["ms"][name] = None
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if args.sweep and on_gpu:
      row["sweep"] = []
      for variant in sweep_variants(batch, heads[1], heads[2], max_len, page_size):
        fn = jax.jit(lambda *a, v=variant: paged_decode_attention_mgpu(*a, **v))
        try:
          row["sweep"].append(dict(variant, ms=mean_ms(fn, inputs, iters)))
        except Exception as e:  # pylint: disable=broad-except
          row["sweep"].append(dict(variant, error=f"{type(e).__name__}: {str(e)[:200]}"))
    rows.append(row)
    elapsed = time.perf_counter() - start
    times = "  ".join(f"{n} {t:.3f} ms ({t / row['floor_ms']:.2f}x floor)" if t else f"{n} failed"
                      for n, t in row["ms"].items())
    print(f"[{done + 1}/{len(shapes)}, {elapsed:.0f}s, ETA {elapsed / (done + 1) * (len(shapes) - done - 1):.0f}s] "
          f"{model} B={batch} page={page_size} mean_len={row['mean_len']:.0f} "
          f"floor {row['floor_ms']:.3f} ms: {times}", flush=True)
  print("\n| model | batch | page | mean len | KV MB | floor ms | "
        + " | ".join(f"{n} ms (x floor)" for n in fns) + " |")
  print("|---" * (6 + len(fns)) + "|")
  for row in rows:
    cells = [f"{t:.3f} ({t / row['floor_ms']:.2f}x)" if t else "failed" for t in row["ms"].values()]
    print(f"| {row['model']} | {row['batch']} | {row['page_size']} | {row['mean_len']:.0f} | "
          f"{row['kv_bytes'] / 1e6:.1f} | {row['floor_ms']:.3f} | " + " | ".join(cells) + " |")
  record = dict(device=device, jax=jax.__version__, python=platform.python_version(),
                command=" ".join(sys.argv), copy_bandwidth_bytes_per_s=bandwidth,
                min_len=min_len, max_len=max_len, tail=args.tail, iters=iters, rows=rows)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
  return record


if __name__ == "__main__":
  main()
