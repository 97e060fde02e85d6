"""Train-step throughput: tokens/s, step time, peak memory and MFU of the pretrain step.

  PYTHONPATH=$PWD python3 benchmarks/train_step.py --presets qwen2.5-1.5b,qwen2.5-3b \
      --seq_len 4096 --batch 4 --doc_len 1024 --out $OUT

Packed rows (documents of `doc_len` tokens, so attention goes through the `kv_end` path),
bf16 compute with float32 master weights and AdamW, one device. MFU = model FLOPs per second
over the bf16 matmul rate measured in the same run (an 8192³ product), where model FLOPs =
6·N·tokens (N without the embedding table, which is a gather) + 12·L·H·D·(visible query-key
pairs) for attention forward and backward. Prints a table; writes JSON.

`--remat` and `--batch` take comma lists (every combination is measured; an out-of-memory
configuration is recorded as such). `--pipeline_steps N` also feeds N steps from the real
input pipeline (synthetic corpus -> tokenizer -> Grain packing, the training loop's
`next(iterator)` then asynchronous dispatch) and reports the device-busy fraction
(resident-batch step time / pipeline-fed step time). `--trace` records an XProf trace of
three steps per configuration next to the JSON and summarises where the time went.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.data import pipeline, synthetic
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import get_preset
from kat_jax.train.state import init_sharded_state
from kat_jax.parallel import (batch_sharding, global_batch, make_mesh,
                              replicated, sharding_context)
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train import profiling
from kat_jax.train.step import make_train_step


def matmul_tflops(size: int = 8192, iters: int = 20) -> float:
  """Measured bf16 matmul rate (TFLOP/s) on random data."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(iters):
    out = mm(a, b)
  out.block_until_ready()
  return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def packed_batch(rng: np.random.Generator, batch: int, seq_len: int, doc_len: int,
                 vocab: int) -> dict[str, np.ndarray]:
  starts = (np.arange(seq_len) // doc_len) * doc_len
  positions = np.arange(seq_len) - starts
  kv_end = np.minimum(starts + doc_len, seq_len)
  pred_index = np.where(positions > 0, np.arange(seq_len) - 1, np.arange(seq_len))
  weights = (positions > 0).astype(np.float32)
  tile = lambda x: np.tile(x.astype(np.int32 if x.dtype != np.float32 else np.float32),
                           (batch, 1))
  return {"tokens": rng.integers(0, vocab, (batch, seq_len)).astype(np.int32),
          "positions": tile(positions), "kv_end": tile(kv_end),
          "pred_index": tile(pred_index), "weights": tile(weights),
          "segment_ids": tile(starts // doc_len + 1)}


def model_flops(config, batch: dict[str, np.ndarray]) -> float:
  tokens = batch["tokens"].size
  # The input embedding is a gather, not a matmul; a tied table is counted once, as the head.
  dense = config.num_params() - (0 if config.tie_word_embeddings
                                 else config.vocab_size * config.hidden_size)
  kv_end = batch["kv_end"]
  pairs = float(np.sum(kv_end - np.arange(kv_end.shape[1])[None]))  # keys j see kv_end[j]-j queries
  attention = 12.0 * config.num_layers * config.num_heads * config.head_dim * pairs
  return 6.0 * dense * tokens + attention


def timed_steps(step, state, batches) -> tuple[Any, list[float], Any]:
  """Runs `step` over `batches` (an iterable of callables giving device batches) one by one."""
  times, metrics = [], None
  for get_batch in batches:
    t0 = time.perf_counter()
    state, metrics = step(state, get_batch())
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return state, times, metrics


def pipeline_iterator(args, vocab_size: int, batch: int):
  """The training input pipeline on a synthetic corpus: packed [batch, seq_len] rows."""
  tokenizer = get_tokenizer(args.tokenizer)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} ids > model vocab")
  corpus = synthetic.generate_corpus(args.corpus_docs, seed=0)
  return iter(pipeline.make_pretrain_dataset(corpus, tokenizer, seq_len=args.seq_len,
                                             batch_size=batch, seed=0))


def dispatched_steps(step, state, feed, steps: int) -> tuple[Any, float]:
  """Seconds per step run as the training loop runs them: `feed()` gives each batch (host work
  for batch n+1 overlaps the device running step n), one sync at the end."""
  state, metrics = step(state, feed())  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, feed())
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - t0) / steps


def bench(preset: str, remat: str, batch_size: int, args, peak_tflops: float) -> dict:
  config = get_preset(preset, dtype="bfloat16", remat_policy=remat,
                      attention_backend=args.attention)
  optim = types.SimpleNamespace(lr=1e-4, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1,
                                b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  optimizer = make_optimizer(optim, 1000)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  host = packed_batch(np.random.default_rng(0), batch_size, args.seq_len, args.doc_len,
                      config.vocab_size)
  row: dict[str, Any] = {"preset": preset, "params": config.num_params(), "batch": batch_size,
                         "seq_len": args.seq_len, "doc_len": args.doc_len, "remat": remat,
                         "attention": args.attention}
  with sharding_context(mesh):
    state, shardings = init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    step = jax.jit(make_train_step(config, optimizer, loss_chunk=args.loss_chunk),
                   in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    batch = global_batch(host, mesh)
    t0 = time.perf_counter()
    state, _, _ = timed_steps(step, state, [lambda: batch])
    row["compile_s"] = time.perf_counter() - t0
    state, times, metrics = timed_steps(step, state, [lambda: batch] * args.steps)
    step_s = statistics.median(times)
    flops = model_flops(config, host)
    stats = jax.devices()[0].memory_stats() or {}
    row.update(step_s=step_s, tokens_per_s=host["tokens"].size / step_s,
               model_tflops_per_s=flops / step_s / 1e12,
               mfu=flops / step_s / 1e12 / peak_tflops,
               peak_memory_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
               loss=float(metrics["loss"]))
    data = None
    if args.pipeline_steps:
      data = pipeline_iterator(args, config.vocab_size, batch_size)
      t0 = time.perf_counter()
      for _ in range(args.pipeline_steps):
        next(data)
      row["host_batch_s"] = (time.perf_counter() - t0) / args.pipeline_steps
      state, row["resident_step_s"] = dispatched_steps(step, state, lambda: batch,
                                                       args.pipeline_steps)
      state, row["pipeline_step_s"] = dispatched_steps(
          step, state, lambda: global_batch(next(data), mesh), args.pipeline_steps)
      row["busy_fraction"] = row["resident_step_s"] / row["pipeline_step_s"]
    if args.trace and args.out:
      trace_dir = os.path.join(args.out, "trace_tmp")
      feed = (lambda: global_batch(next(data), mesh)) if data is not None else (lambda: batch)
      with jax.profiler.trace(trace_dir):
        state, _, _ = timed_steps(step, state, [feed] * 3)
      source = profiling.find_trace_file(trace_dir)
      row["trace_summary"] = profiling.summarize_trace(source)
      name = f"trace_{preset}_{remat}_b{batch_size}.xplane.pb.gz"
      with open(source, "rb") as src, gzip.open(os.path.join(args.out, name), "wb") as dst:
        shutil.copyfileobj(src, dst)
      shutil.rmtree(trace_dir)
      row["trace_file"] = name
      print(profiling.format_summary(row["trace_summary"]))
  del state
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="qwen2.5-1.5b,qwen2.5-3b")
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--batch", default="4", help="comma list")
  parser.add_argument("--doc_len", type=int, default=1024)
  parser.add_argument("--remat", default="dots_no_batch", help="comma list")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--loss_chunk", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--pipeline_steps", type=int, default=0)
  parser.add_argument("--tokenizer", default="qwen2.5")
  parser.add_argument("--corpus_docs", type=int, default=20000)
  parser.add_argument("--trace", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  peak = matmul_tflops() if jax.default_backend() == "gpu" else matmul_tflops(1024, 3)
  rows = []
  for preset, remat, batch in itertools.product(
      args.presets.split(","), args.remat.split(","), [int(b) for b in args.batch.split(",")]):
    try:
      rows.append(bench(preset, remat, batch, args, peak))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: record it)
      rows.append({"preset": preset, "remat": remat, "batch": batch,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(json.dumps(rows[-1])[:400], flush=True)
    _write(args, peak, rows)
  result = _write(args, peak, rows)
  print(f"\n{result['device']}: bf16 matmul {peak:.0f} TFLOP/s")
  print(f"{'preset':>14} {'remat':>14} {'batch':>5} {'step s':>8} {'tok/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9} {'busy':>6}")
  for r in rows:
    head = f"{r['preset']:>14} {r['remat']:>14} {r['batch']:>5}"
    if "error" in r:
      print(f"{head} {r['error'][:100]}")
      continue
    busy = f"{r['busy_fraction']:6.1%}" if "busy_fraction" in r else ""
    print(f"{head} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} "
          f"{r['model_tflops_per_s']:8.1f} {r['mfu']:6.1%} {r['peak_memory_gib']:9.1f} {busy}")


def _write(args, peak: float, rows: list[dict]) -> dict:
  """The JSON result (rewritten after every configuration, so a cut-off run keeps its rows)."""
  result = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "matmul_tflops": peak, "rows": rows}
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
