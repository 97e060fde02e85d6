"""Benchmark: Pallas tree attention on a prefix tree vs cuDNN on the unrolled paths vs FlexAttention.

Workload (issue 9): a prefix tree with branching 1-4-2-2 and segment lengths 1024-512-512-1024
laid out depth-first (23,552 tokens, 16 root-to-leaf paths of 3,072 tokens), 32 query and 32 kv
heads of dim 128, bf16.  Compares, in one run:
  (a) `tree_attention` on the tree;
  (b) cuDNN causal attention on the 16 unrolled paths (`jax.nn.dot_product_attention`);
  (c) PyTorch FlexAttention (torch.compile) with the same tree mask as a block mask;
  (d) the FLOP floor: visible pairs x 4*H*D (fwd; x3.5 for fwd+bwd) at the bf16 matmul rate
      measured here with a large jnp matmul.
It first checks correctness on the GPU: small random trees (bf16/f32, GQA) against the
reference, and at the benchmark size a few heads against the reference (outputs and grads) and
all leaf paths against cuDNN.

  PYTHONPATH=$PWD python3 benchmarks/tree_attention.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

import numpy as np  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp

from kat_jax.kernels import attention_reference
from kat_jax.kernels import KernelTiles
from kat_jax.kernels import tree_attention
from kat_jax.kernels import Tuning
from kat_jax.kernels.checks import kernel_and_reference
from kat_jax.testing import random_tree_kv_end, relative_error


def build_tree(branching=(1, 4, 2, 2), segments=(1024, 512, 512, 1024)):
  """Depth-first prefix tree -> (kv_end [T] int32, paths [P, path_len] int32 token indices)."""
  kv_end, paths = [], []

  def node(depth: int, prefix: list[int]):
    start = len(kv_end)
    kv_end.extend([0] * segments[depth])
    path = prefix + list(range(start, start + segments[depth]))
    if depth + 1 == len(segments):
      paths.append(path)
    else:
      for _ in range(branching[depth + 1]):
        node(depth + 1, path)
    kv_end[start:start + segments[depth]] = [len(kv_end)] * segments[depth]

  for _ in range(branching[0]):
    node(0, [])
  return np.asarray(kv_end, np.int32), np.asarray(paths, np.int32)


def visible_pairs(kv_end: np.ndarray) -> int:
  """Number of (query, key) pairs with j <= i < kv_end[j]."""
  return int(np.sum(np.maximum(kv_end - np.arange(len(kv_end)), 0)))


def median_ms_jax(fn, *args, warmup=3, iters=20) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def matmul_tflops(n=8192) -> float:
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
  ms = median_ms_jax(jax.jit(lambda a, b: a @ b), a, b, warmup=5, iters=30)
  return 2 * n**3 / (ms * 1e-3) / 1e12


def check_small(tuning: Tuning, log) -> list[dict]:
  """Random trees / packed / causal, bf16 and f32, GQA, vs the reference (outputs and grads)."""
  rng = np.random.default_rng(0)
  results = []
  cases = [(jnp.bfloat16, 1000, 8, 8, 128), (jnp.float32, 777, 8, 2, 64),
           (jnp.bfloat16, 515, 4, 1, 64)]
  for dtype, length, hq, hkv, dim in cases:
    kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length, max_segment=40),
                                   np.full(length, length, np.int32)]))
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q = jax.random.normal(keys[0], (2, length, hq, dim), dtype)
    k = jax.random.normal(keys[1], (2, length, hkv, dim), dtype)
    v = jax.random.normal(keys[2], (2, length, hkv, dim), dtype)
    do = jax.random.normal(keys[3], q.shape, dtype)
    pairs = kernel_and_reference(q, k, v, do, kv_end, tuning=tuning)
    errs = {name: relative_error(got, want) for name, (got, want) in pairs.items()}
    finite = bool(all(jnp.all(jnp.isfinite(got)) for got, _ in pairs.values()))
    case = dict(dtype=jnp.dtype(dtype).name, T=length, Hq=hq, Hkv=hkv, D=dim, finite=finite,
                **errs)
    log(f"small check {case}")
    results.append(case)
  return results


def check_benchmark_size(q, k, v, do, kv_end, paths, tuning, heads, log) -> dict:
  """Benchmark-size check: `heads` heads vs the f32 reference, all paths' outputs vs cuDNN."""
  fn = lambda q, k, v: tree_attention(q, k, v, kv_end, tuning=tuning)
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  dq, dk, dv = vjp(do)
  result = {"finite": bool(all(jnp.all(jnp.isfinite(x)) for x in (out, dq, dk, dv)))}
  f32 = lambda x: x[:, :, :heads].astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref, ref_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, kv_end),
                           f32(q), f32(k), f32(v))
    rdq, rdk, rdv = ref_vjp(f32(do))
  result.update(heads_checked=heads, out=relative_error(out[:, :, :heads], ref),
                dq=relative_error(dq[:, :, :heads], rdq), dk=relative_error(dk[:, :, :heads], rdk),
                dv=relative_error(dv[:, :, :heads], rdv))
  del ref, rdq, rdk, rdv
  # Every leaf path of the tree is a causal sequence: gather it and compare with cuDNN.
  unrolled = [jnp.take(x[0], paths, axis=0) for x in (q, k, v)]
  cudnn = jax.nn.dot_product_attention(*unrolled, is_causal=True, implementation="cudnn")
  result["paths_vs_cudnn"] = relative_error(jnp.take(out[0], paths, axis=0), cudnn)
  log(f"benchmark-size check {result}")
  return result


def bench_tree_kernel(q, k, v, do, kv_end, tuning) -> tuple[float, float]:
  fwd = jax.jit(lambda q, k, v: tree_attention(q, k, v, kv_end, tuning=tuning))
  fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(
      lambda q, k, v: tree_attention(q, k, v, kv_end, tuning=tuning), q, k, v)[1](do))
  return median_ms_jax(fwd, q, k, v), median_ms_jax(fwd_bwd, q, k, v, do)


def bench_cudnn(q, k, v, do) -> tuple[float, float]:
  attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation="cudnn")
  fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
  return median_ms_jax(jax.jit(attend), q, k, v), median_ms_jax(fwd_bwd, q, k, v, do)


def bench_mosaic_gpu(q, k, v, do) -> dict:
  """JAX's Mosaic GPU FlashAttention-3 kernel (`attention_mgpu`, wgmma + TMA, warp-specialised)
  on the unrolled paths vs cuDNN on the same shapes: how fast a Hopper-native Pallas kernel
  is here, before writing a tree-masked one. Its backward has no causal mask (yet), so
  fwd+bwd is compared without a mask on both sides. float16 on both sides: the kernel's
  shared-memory scratch is float16 in jax 0.11.2 (bf16 inputs fail there)."""
  q, k, v, do = (x.astype(jnp.float16) for x in (q, k, v, do))
  q_scaled = lambda q: q * jnp.asarray(q.shape[-1]**-0.5, q.dtype)  # attention_mgpu: no scale
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {"error": f"attention_mgpu unavailable: {e}"}
  result = {}
  cudnn = lambda causal: (lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="cudnn"))
  cases = {
      "causal_fwd": (mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2,
                                       causal=True), True, False),
      "full_fwd_bwd": (mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2,
                                         block_q_dkv=64, block_kv_dkv=128, block_q_dq=64,
                                         block_kv_dq=128), False, True),
  }
  for name, (config, causal, backward) in cases.items():
    try:
      attend = lambda q, k, v, config=config: mgpu.attention(q_scaled(q), k, v, config)
      ref = cudnn(causal)
      err = relative_error(jax.jit(attend)(q, k, v), ref(q, k, v))
      if backward:
        grad = lambda f: jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
        ms, cudnn_ms = median_ms_jax(grad(attend), q, k, v, do), median_ms_jax(grad(ref), q, k,
                                                                               v, do)
      else:
        ms, cudnn_ms = median_ms_jax(jax.jit(attend), q, k, v), median_ms_jax(jax.jit(ref), q,
                                                                              k, v)
      result[name] = dict(mosaic_gpu_ms=ms, cudnn_ms=cudnn_ms, rel_err_vs_cudnn=err)
    except Exception as e:  # pylint: disable=broad-except  # a probe must not cost the run
      result[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
  return result


def bench_flex(kv_end: np.ndarray, heads: int, dim: int) -> tuple[float, float] | str:
  """FlexAttention (torch.compile) with the tree mask; returns (fwd_ms, fwd_bwd_ms)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention import flex_attention as fa  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return f"torch unavailable: {e}"
  device = "cuda"
  length = len(kv_end)
  ends = torch.tensor(kv_end, device=device)

  def tree_mask(b, h, q_idx, kv_idx):
    del b, h
    return (kv_idx <= q_idx) & (q_idx < ends[kv_idx])

  block_mask = fa.create_block_mask(tree_mask, None, None, length, length, device=device)
  flex = torch.compile(fa.flex_attention)
  gen = torch.Generator(device=device).manual_seed(0)
  make = lambda: torch.randn(1, heads, length, dim, device=device, dtype=torch.bfloat16,
                             generator=gen)
  q, k, v, do = make(), make(), make(), make()
  for x in (q, k, v):
    x.requires_grad_(True)

  def run_fwd():
    with torch.no_grad():
      return flex(q, k, v, block_mask=block_mask)

  def run_fwd_bwd():
    out = flex(q, k, v, block_mask=block_mask)
    return torch.autograd.grad(out, (q, k, v), do)

  def median_ms(fn, warmup=3, iters=20):
    for _ in range(warmup):
      fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      fn()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end))
    return statistics.median(times)

  return median_ms(run_fwd), median_ms(run_fwd_bwd)


def parse_tiles(text: str) -> KernelTiles:
  """'bq,bk,warps,stages' -> KernelTiles."""
  bq, bk, warps, stages = (int(x) for x in text.split(","))
  return KernelTiles(bq, bk, warps, stages)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--fwd", default="128,128,8,2", help="bq,bk,warps,stages")
  parser.add_argument("--dq", default="64,64,4,2")
  parser.add_argument("--dkdv", default="64,64,4,2")
  parser.add_argument("--sweep-fwd", nargs="*", default=[], help="extra fwd tiles to time")
  parser.add_argument("--sweep-bwd", nargs="*", default=[],
                      help="extra 'dq_tiles/dkdv_tiles' pairs to time in fwd+bwd")
  parser.add_argument("--check-heads", type=int, default=1)
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument("--skip-flex", action="store_true")
  parser.add_argument("--mosaic-gpu", action="store_true",
                      help="also time JAX's Mosaic GPU FlashAttention-3 kernel on the paths")
  parser.add_argument("--name", default="tree_attention_h100.json")
  args = parser.parse_args()
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  tuning = Tuning(parse_tiles(args.fwd), parse_tiles(args.dq), parse_tiles(args.dkdv))
  heads, dim = 32, 128
  kv_end_np, paths = build_tree()
  length = len(kv_end_np)
  pairs_tree = visible_pairs(kv_end_np)
  pairs_unrolled = paths.shape[0] * paths.shape[1] * (paths.shape[1] + 1) // 2
  device = jax.devices()[0]
  log(f"device {device.device_kind}; jax {jax.__version__}; T={length}; paths {paths.shape}; "
      f"tree pairs {pairs_tree:,}; unrolled pairs {pairs_unrolled:,}")
  record = dict(device=device.device_kind, jax_version=jax.__version__,
                python=platform.python_version(), command=" ".join(sys.argv),
                workload=dict(branching=[1, 4, 2, 2], segments=[1024, 512, 512, 1024],
                              tokens=length, paths=list(paths.shape), heads_q=heads,
                              heads_kv=heads, head_dim=dim, dtype="bfloat16",
                              tree_visible_pairs=pairs_tree,
                              unrolled_visible_pairs=pairs_unrolled),
                tuning={n: t._asdict() for n, t in zip(Tuning._fields, tuning)})

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(key, (1, length, heads, dim), jnp.bfloat16) for key in keys)
  kv_end = jnp.asarray(kv_end_np)[None]

  if not args.skip_checks:
    record["check_small"] = check_small(tuning, log)
    record["check_benchmark_size"] = check_benchmark_size(q, k, v, do, kv_end, paths, tuning,
                                                          args.check_heads, log)

  rate = matmul_tflops()
  log(f"bf16 matmul 8192^3: {rate:.0f} TFLOP/s")
  fwd_flops = 4 * heads * dim * pairs_tree
  times = {}
  times["tree_kernel"] = bench_tree_kernel(q, k, v, do, kv_end, tuning)
  log(f"tree kernel: fwd {times['tree_kernel'][0]:.3f} ms, fwd+bwd {times['tree_kernel'][1]:.3f} ms")
  sweep = []
  for text in args.sweep_fwd:
    t = Tuning(parse_tiles(text), tuning.dq, tuning.dkdv)
    try:
      fwd_ms = median_ms_jax(jax.jit(lambda q, k, v, t=t: tree_attention(q, k, v, kv_end,
                                                                          tuning=t)), q, k, v)
      sweep.append(dict(fwd=text, fwd_ms=fwd_ms))
    except Exception as e:  # pylint: disable=broad-except
      sweep.append(dict(fwd=text, error=str(e)[:300]))
    log(f"sweep {sweep[-1]}")
  for text in args.sweep_bwd:
    dq_text, dkdv_text = text.split("/")
    t = Tuning(tuning.fwd, parse_tiles(dq_text), parse_tiles(dkdv_text))
    try:
      sweep.append(dict(dq=dq_text, dkdv=dkdv_text,
                        fwd_bwd_ms=bench_tree_kernel(q, k, v, do, kv_end, t)[1]))
    except Exception as e:  # pylint: disable=broad-except
      sweep.append(dict(dq=dq_text, dkdv=dkdv_text, error=str(e)[:300]))
    log(f"sweep {sweep[-1]}")
  record["sweep"] = sweep

  unrolled = [jnp.take(x[0], jnp.asarray(paths), axis=0) for x in (q, k, v, do)]
  times["cudnn_unrolled"] = bench_cudnn(*unrolled)
  if args.mosaic_gpu:
    record["mosaic_gpu_unrolled"] = bench_mosaic_gpu(*unrolled)
    log(f"mosaic gpu (attention_mgpu) on the paths: {record['mosaic_gpu_unrolled']}")
  del unrolled
  if not args.skip_flex:
    flex = bench_flex(kv_end_np, heads, dim)
    if isinstance(flex, str):
      record["flex_error"] = flex
    else:
      times["flex_tree"] = flex
  floor_fwd = fwd_flops / (rate * 1e12) * 1e3
  times["flop_floor"] = (floor_fwd, 3.5 * floor_fwd)  # bwd = 5 matmuls of the fwd's 2

  cudnn_rate = 4 * heads * dim * pairs_unrolled / (times["cudnn_unrolled"][0] * 1e-3) / 1e12
  tree_rate = fwd_flops / (times["tree_kernel"][0] * 1e-3) / 1e12
  record.update(matmul_tflops=rate, times_ms={n: dict(fwd=f, fwd_bwd=fb)
                                              for n, (f, fb) in times.items()},
                fwd_tflops=dict(tree_kernel=tree_rate, cudnn_unrolled=cudnn_rate),
                tree_fwd_rate_vs_cudnn=tree_rate / cudnn_rate)
  log(f"{'method':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}")
  for name, (f, fb) in times.items():
    log(f"{name:<18}{f:>10.3f}{fb:>12.3f}")
  log(f"fwd rate (visible pairs): tree {tree_rate:.0f} TFLOP/s, cuDNN causal {cudnn_rate:.0f} "
      f"TFLOP/s, ratio {tree_rate / cudnn_rate:.2f}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, args.name), "w") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(args.out, "tree_attention_log.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
