"""Train-step throughput: tokens/s, step time, peak memory and MFU of the pretrain step.

  PYTHONPATH=$PWD python3 benchmarks/train_step.py --presets qwen2.5-1.5b,qwen2.5-3b \
      --seq_len 4096 --batch 4 --doc_len 1024 --out $OUT

Packed rows (documents of `doc_len` tokens, so attention goes through the `kv_end` path),
bf16 compute with float32 master weights and AdamW, one device. MFU = model FLOPs per second
over the bf16 matmul rate measured in the same run (an 8192³ product), where model FLOPs =
6·N·tokens (N without the embedding table, which is a gather) + 12·L·H·D·(visible query-key
pairs) for attention forward and backward. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model import get_preset
from kat_jax.parallel import (batch_sharding, global_batch, init_sharded_state, make_mesh,
                              replicated, sharding_context)
from kat_jax.train.optimizer import make_optimizer
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


def bench(preset: str, args, peak_tflops: float) -> dict:
  config = get_preset(preset, dtype="bfloat16", remat_policy=args.remat,
                      attention_backend=args.attention)
  optim = types.SimpleNamespace(lr=1e-4, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1,
                                b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  optimizer = make_optimizer(optim, 1000)
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  host = packed_batch(np.random.default_rng(0), args.batch, args.seq_len, args.doc_len,
                      config.vocab_size)
  with sharding_context(mesh):
    state, shardings = init_sharded_state(config, optimizer, mesh, jax.random.key(0))
    step = jax.jit(make_train_step(config, optimizer, loss_chunk=args.loss_chunk),
                   in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    batch = global_batch(host, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  flops = model_flops(config, host)
  stats = jax.devices()[0].memory_stats() or {}
  return {"preset": preset, "params": config.num_params(), "batch": args.batch,
          "seq_len": args.seq_len, "doc_len": args.doc_len, "remat": args.remat,
          "attention": args.attention, "compile_s": compile_s, "step_s": step_s,
          "tokens_per_s": host["tokens"].size / step_s,
          "model_tflops_per_s": flops / step_s / 1e12,
          "mfu": flops / step_s / 1e12 / peak_tflops,
          "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
          "loss": float(metrics["loss"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="qwen2.5-1.5b,qwen2.5-3b")
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--doc_len", type=int, default=1024)
  parser.add_argument("--remat", default="dots_no_batch")
  parser.add_argument("--attention", default="auto")
  parser.add_argument("--loss_chunk", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  peak = matmul_tflops() if jax.default_backend() == "gpu" else matmul_tflops(1024, 3)
  rows = []
  for preset in args.presets.split(","):
    try:
      rows.append(bench(preset, args, peak))
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory: record it)
      rows.append({"preset": preset, "error": f"{type(e).__name__}: {str(e)[:300]}"})
  result = {"device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "matmul_tflops": peak, "rows": rows}
  print(f"\n{result['device']}: bf16 matmul {peak:.0f} TFLOP/s")
  print(f"{'preset':>14} {'step s':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
  for r in rows:
    if "error" in r:
      print(f"{r['preset']:>14} {r['error']}")
      continue
    print(f"{r['preset']:>14} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} "
          f"{r['model_tflops_per_s']:8.1f} {r['mfu']:6.1%} {r['peak_memory_gib']:9.1f}")
  if args.out:
    import os  # pylint: disable=g-import-not-at-top
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
