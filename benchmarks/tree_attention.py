"""Benchmark: Pallas tree attention on a prefix tree vs cuDNN on the unrolled paths vs FlexAttention.

Anchor workload: a prefix tree with branching 1-4-2-2 and segment lengths 1024-512-512-1024
laid out depth-first (23,552 tokens, 16 root-to-leaf paths of 3,072 tokens), 32 query and 32 kv
heads of dim 128, bf16.  Compares, in one run:
  (a) `tree_attention` on the tree, for each `--backends` entry ('gpu' = Triton, 'mgpu' =
      Mosaic GPU);
  (b) cuDNN causal attention on the 16 unrolled paths (`jax.nn.dot_product_attention`);
  (c) PyTorch FlexAttention (torch.compile) with the same tree mask as a block mask;
  (d) JAX's stock Mosaic GPU FlashAttention-3 forward (`attention_mgpu`, q pre-scaled by
      D^-1/2, block_q=64, block_kv=128, 2 stages) on the unrolled paths beside cuDNN: the rate
      a tree kernel should reach on its full tiles;
  (e) plain causal rows (1 x T x 32 x 128, T = 4096 and 16384): the tree backends vs cuDNN;
  (f) the FLOP floor: visible pairs x 4*H*D (fwd; x3.5 for fwd+bwd) at the bf16 matmul rate
      measured here; every rate also as MFU over the H100/H200 dense bf16 peak (989 TFLOP/s).
It first checks correctness on the GPU: small random trees against the reference, and at the
benchmark size a few heads against the reference (outputs and grads) and all leaf paths
against cuDNN.

  PYTHONPATH=$PWD python3 benchmarks/tree_attention.py --out $OUT
  PYTHONPATH=$PWD python3 benchmarks/tree_attention.py --tiny --out /tmp/x   # CPU smoke run

`--tiny` shrinks every workload and runs the tree kernels interpreted on CPU; the GPU-only
methods (cuDNN, FlexAttention, attention_mgpu) are recorded as skipped with the reason.
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
from kat_jax.kernels import causal_kv_end
from kat_jax.kernels import KernelTiles
from kat_jax.kernels import tree_attention
from kat_jax.kernels import Tuning
from kat_jax.kernels import tree_attention_mgpu
from kat_jax.kernels.tree_attention import DEFAULT_TUNING as DEFAULT_TUNING_TRITON
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


PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16 tensor-core peak
# Both timers (JAX's and FlexAttention's) do the same: back-to-back calls for warmup_s first,
# since the GPU's clocks drop during the compiles before each timing and take a while to come
# back; then `reps` timings of `calls` back-to-back calls each (so the host's dispatch and sync
# latency is paid once per timing, not per call), and the median per call.
TIMING = {"warmup_s": 0.5, "reps": 10, "calls": 10}  # --tiny: 0 / 1 / 1


def timed_ms(run, sync) -> float:
  """Median ms per call of `run()` by TIMING; `sync()` waits for the device's queued work."""
  start = time.perf_counter()
  run()
  sync()
  while time.perf_counter() - start < TIMING["warmup_s"]:
    run()
    sync()
  times = []
  for _ in range(TIMING["reps"]):
    start = time.perf_counter()
    for _ in range(TIMING["calls"]):
      run()
    sync()
    times.append((time.perf_counter() - start) / TIMING["calls"])
  return 1e3 * statistics.median(times)


def median_ms_jax(fn, *args) -> float:
  last = []

  def run():
    last[:] = [fn(*args)]  # keeps only the newest output alive

  return timed_ms(run, lambda: jax.block_until_ready(last))


def matmul_tflops(n=8192) -> float:
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
  ms = median_ms_jax(jax.jit(lambda a, b: a @ b), a, b)
  return 2 * n**3 / (ms * 1e-3) / 1e12


def rate_record(flops: float, ms: float, matmul_rate: float) -> dict:
  """Achieved TFLOP/s on useful work, as MFU over the bf16 peak and over the measured matmul."""
  tflops = flops / (ms * 1e-3) / 1e12
  return dict(ms=ms, tflops=tflops, mfu_vs_peak=tflops / PEAK_BF16_TFLOPS,
              fraction_of_matmul_rate=tflops / matmul_rate)


def attempt(fn, *args, **kwargs):
  """fn(...) or {'error': ...}: one failing method must not cost the rest of the run."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"[:400]}


def tree_fn(kv_end, backend: str, tunings: dict, interpret: bool):
  """(q, k, v) -> tree_attention output with the backend's tuning."""
  return lambda q, k, v: tree_attention(q, k, v, kv_end, backend=backend,
                                        tuning=tunings[backend], interpret=interpret)


def check_small(backend: str, tunings: dict, log) -> list[dict]:
  """Random trees / packed / causal, 16-bit (and f32 for Triton), GQA, vs the reference."""
  rng = np.random.default_rng(0)
  results = []
  cases = [(jnp.bfloat16, 1000, 8, 8, 128), (jnp.float32, 777, 8, 2, 64),
           (jnp.bfloat16, 515, 4, 1, 64)]
  if backend == "mgpu":  # 16-bit inputs only
    cases = [(jnp.bfloat16, 1000, 8, 8, 128), (jnp.float16, 777, 8, 2, 64),
             (jnp.bfloat16, 515, 4, 1, 64)]
  for dtype, length, hq, hkv, dim in cases:
    kv_end = jnp.asarray(np.stack([random_tree_kv_end(rng, length, max_segment=40),
                                   np.full(length, length, np.int32)]))
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q = jax.random.normal(keys[0], (2, length, hq, dim), dtype)
    k = jax.random.normal(keys[1], (2, length, hkv, dim), dtype)
    v = jax.random.normal(keys[2], (2, length, hkv, dim), dtype)
    do = jax.random.normal(keys[3], q.shape, dtype)
    pairs = kernel_and_reference(q, k, v, do, kv_end, backend=backend, tuning=tunings[backend])
    errs = {name: relative_error(got, want) for name, (got, want) in pairs.items()}
    finite = bool(all(jnp.all(jnp.isfinite(got)) for got, _ in pairs.values()))
    case = dict(backend=backend, dtype=jnp.dtype(dtype).name, T=length, Hq=hq, Hkv=hkv, D=dim,
                finite=finite, **errs)
    log(f"small check {case}")
    results.append(case)
  return results


def check_benchmark_size(attend, q, k, v, do, kv_end, paths, heads, on_gpu, log) -> dict:
  """Benchmark-size check: `heads` heads vs the f32 reference, all paths' outputs vs cuDNN."""
  out, vjp = jax.vjp(jax.jit(attend), q, k, v)
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
  if on_gpu:  # every leaf path of the tree is a causal sequence: compare with cuDNN
    unrolled = [jnp.take(x[0], paths, axis=0) for x in (q, k, v)]
    cudnn = jax.nn.dot_product_attention(*unrolled, is_causal=True, implementation="cudnn")
    result["paths_vs_cudnn"] = relative_error(jnp.take(out[0], paths, axis=0), cudnn)
  log(f"benchmark-size check {result}")
  return result


def bench_attention(attend, q, k, v, do) -> tuple[float, float]:
  """(fwd ms, fwd+bwd ms) of attend(q, k, v)."""
  fwd_bwd = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
  return median_ms_jax(jax.jit(attend), q, k, v), median_ms_jax(fwd_bwd, q, k, v, do)


def sweep_config(fn, args, first_outputs) -> dict:
  """ms of jax.jit(fn)(*args) (one compilation) and its outputs; with `first_outputs` (those
  of the sweep's first config), also the largest relative error against them: a tile variant
  must not change the result."""
  jitted = jax.jit(fn)
  outputs = jax.tree.leaves(jitted(*args))
  result = dict(ms=median_ms_jax(jitted, *args), outputs=outputs,
                finite=bool(all(jnp.all(jnp.isfinite(x)) for x in outputs)))
  if first_outputs is not None:
    result["vs_first_config"] = max(relative_error(x, f) for x, f in zip(outputs, first_outputs))
  return result


def cudnn_causal(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def stock_mgpu_attention(causal: bool, backward: bool):
  """JAX's `attention_mgpu.attention` as issue 25 prescribes: q pre-scaled by D^-1/2 (the
  kernel applies no softmax scale), block_q=64, block_kv=128, max_concurrent_steps=2."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  extra = dict(block_q_dkv=64, block_kv_dkv=128, block_q_dq=64, block_kv_dq=128) if backward else {}
  config = mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
                             **extra)
  return lambda q, k, v: mgpu.attention(q * jnp.asarray(q.shape[-1]**-0.5, q.dtype), k, v,
                                        config)


def bench_stock_mgpu(q, k, v, do, log) -> dict:
  """Stock `attention_mgpu` beside cuDNN on the same inputs (float16 on both sides: its
  shared-memory scratch is float16 in jax 0.11.2): causal forward, and unmasked fwd+bwd (it
  has no causal backward)."""
  q, k, v, do = (x.astype(jnp.float16) for x in (q, k, v, do))
  result = {}
  causal = stock_mgpu_attention(causal=True, backward=False)
  result["causal_fwd"] = attempt(lambda: dict(
      mosaic_gpu_ms=median_ms_jax(jax.jit(causal), q, k, v),
      cudnn_ms=median_ms_jax(jax.jit(cudnn_causal), q, k, v),
      rel_err_vs_cudnn=relative_error(jax.jit(causal)(q, k, v), cudnn_causal(q, k, v))))
  full = stock_mgpu_attention(causal=False, backward=True)
  cudnn_full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  result["full_fwd_bwd"] = attempt(lambda: dict(
      mosaic_gpu_ms=bench_attention(full, q, k, v, do)[1],
      cudnn_ms=bench_attention(cudnn_full, q, k, v, do)[1]))
  log(f"stock attention_mgpu vs cuDNN: {result}")
  return result


def bench_causal_rows(lengths, heads, dim, backends, tunings, interpret, on_gpu, matmul_rate,
                      log) -> dict:
  """Plain causal rows 1 x T x heads x dim bf16: each tree backend vs cuDNN (and the stock
  attention_mgpu forward, float16)."""
  result = {}
  for length in lengths:
    keys = jax.random.split(jax.random.PRNGKey(length), 4)
    q, k, v, do = (jax.random.normal(key, (1, length, heads, dim), jnp.bfloat16)
                   for key in keys)
    kv_end = causal_kv_end(1, length)
    fwd_flops = 4 * heads * dim * length * (length + 1) / 2
    row = {}
    for backend in backends:
      times = attempt(bench_attention, tree_fn(kv_end, backend, tunings, interpret), q, k, v, do)
      row[f"tree_{backend}"] = times if isinstance(times, dict) else dict(
          fwd=rate_record(fwd_flops, times[0], matmul_rate), fwd_bwd_ms=times[1])
    if on_gpu:
      times = bench_attention(cudnn_causal, q, k, v, do)
      row["cudnn"] = dict(fwd=rate_record(fwd_flops, times[0], matmul_rate), fwd_bwd_ms=times[1])
      f16 = [x.astype(jnp.float16) for x in (q, k, v)]
      row["stock_attention_mgpu_f16"] = attempt(lambda: dict(fwd=rate_record(
          fwd_flops, median_ms_jax(jax.jit(stock_mgpu_attention(True, False)), *f16),
          matmul_rate)))
      for backend in backends:
        tree = row[f"tree_{backend}"]
        if "fwd" in tree:
          tree["fwd_vs_cudnn"] = row["cudnn"]["fwd"]["ms"] / tree["fwd"]["ms"]
    else:
      row["cudnn"] = row["stock_attention_mgpu_f16"] = {"skipped": "needs a CUDA GPU"}
    log(f"causal rows T={length}: {row}")
    result[str(length)] = row
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

  def median_ms(fn):
    return timed_ms(fn, torch.cuda.synchronize)

  return median_ms(run_fwd), median_ms(run_fwd_bwd)


def parse_tiles(text: str) -> KernelTiles:
  """'bq,bk,warps,stages[,ping_pong]' -> KernelTiles (warps 0 = default; unused by 'mgpu';
  ping_pong 0/1 = the Mosaic GPU warp-specialised forward's or dQ's schedule barrier, e.g.
  '128,128,0,2,1'); ValueError for another number of fields."""
  fields = [int(x) for x in text.split(",")]
  if len(fields) not in (4, 5):
    raise ValueError(f"tiles {text!r}: expected bq,bk,warps,stages[,ping_pong]")
  bq, bk, warps, stages, *flag = fields
  return KernelTiles(bq, bk, warps or None, stages, bool(flag and flag[0]))


def format_tiles(tiles: KernelTiles) -> str:
  """KernelTiles -> 'bq,bk,warps,stages[,1]' (parse_tiles' inverse): the options' defaults are
  the kernels' own DEFAULT_TUNINGs, so a plain run times what `tree_attention` runs."""
  fields = [tiles.block_q, tiles.block_k, tiles.num_warps or 0, tiles.num_stages or 2]
  return ",".join(map(str, fields + [1] * tiles.ping_pong))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--backends", default="gpu,mgpu",
                      help="tree_attention backends to time: gpu (Triton), mgpu (Mosaic GPU)")
  triton, mgpu = DEFAULT_TUNING_TRITON, tree_attention_mgpu.DEFAULT_TUNING
  parser.add_argument("--fwd", default=format_tiles(triton.fwd), help="Triton bq,bk,warps,stages")
  parser.add_argument("--dq", default=format_tiles(triton.dq))
  parser.add_argument("--dkdv", default=format_tiles(triton.dkdv))
  parser.add_argument("--mgpu-fwd", default=format_tiles(mgpu.fwd),
                      help="Mosaic GPU bq,bk,0,stages[,ping_pong] (bq 128: warp-specialised, "
                      "64: one warpgroup)")
  parser.add_argument("--mgpu-dq", default=format_tiles(mgpu.dq))
  parser.add_argument("--mgpu-dkdv", default=format_tiles(mgpu.dkdv), help="bq,bk,0,stages")
  parser.add_argument("--sweep-fwd", nargs="*", default=[],
                      help="fwd tiles to time (first backend), each checked against the first "
                      "one's output (list the default first)")
  parser.add_argument("--sweep-bwd", nargs="*", default=[],
                      help="'dq_tiles/dkdv_tiles' pairs to time in fwd+bwd (first backend), "
                      "each checked against the first pair's grads (list the default first)")
  parser.add_argument("--causal-lengths", default="4096,16384")
  parser.add_argument("--check-heads", type=int, default=1)
  parser.add_argument("--skip-checks", action="store_true")
  parser.add_argument("--skip-peers", action="store_true",
                      help="time only the tree kernels: no cuDNN, FlexAttention or stock "
                      "attention_mgpu (sweeps)")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU smoke run: tiny workloads, kernels interpreted, 1 timed call")
  parser.add_argument("--name", default="tree_attention.json")
  args = parser.parse_args(argv)
  for text in [args.fwd, args.dq, args.dkdv, args.mgpu_fwd, args.mgpu_dq, args.mgpu_dkdv,
               *args.sweep_fwd, *(t for pair in args.sweep_bwd for t in pair.split("/"))]:
    try:
      parse_tiles(text)
    except ValueError as e:
      parser.error(str(e))
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  lines = []

  def log(msg):
    print(msg, flush=True)
    lines.append(msg)

  on_gpu = jax.default_backend() == "gpu"
  interpret = args.tiny and not on_gpu
  backends = [b for b in args.backends.split(",") if b]
  tunings = {"gpu": Tuning(parse_tiles(args.fwd), parse_tiles(args.dq), parse_tiles(args.dkdv)),
             "mgpu": Tuning(parse_tiles(args.mgpu_fwd), parse_tiles(args.mgpu_dq),
                            parse_tiles(args.mgpu_dkdv))}
  if args.tiny:
    TIMING.update(warmup_s=0, reps=1, calls=1)
    branching, segments, heads, dim = (1, 2, 2), (32, 32, 32), 2, 64
    causal_lengths = [128]
  else:
    branching, segments, heads, dim = (1, 4, 2, 2), (1024, 512, 512, 1024), 32, 128
    causal_lengths = [int(x) for x in args.causal_lengths.split(",") if x]
  kv_end_np, paths = build_tree(branching, segments)
  length = len(kv_end_np)
  pairs_tree = visible_pairs(kv_end_np)
  pairs_unrolled = paths.shape[0] * paths.shape[1] * (paths.shape[1] + 1) // 2
  device = jax.devices()[0]
  log(f"device {device.device_kind}; jax {jax.__version__}; T={length}; paths {paths.shape}; "
      f"tree pairs {pairs_tree:,}; unrolled pairs {pairs_unrolled:,}; backends {backends}"
      f"{' (interpreted)' if interpret else ''}")
  record = dict(device=device.device_kind, jax_version=jax.__version__,
                python=platform.python_version(), command=" ".join(sys.argv), tiny=args.tiny,
                interpreted=interpret, peak_bf16_tflops=PEAK_BF16_TFLOPS,
                workload=dict(branching=list(branching), segments=list(segments), tokens=length,
                              paths=list(paths.shape), heads_q=heads, heads_kv=heads,
                              head_dim=dim, dtype="bfloat16", tree_visible_pairs=pairs_tree,
                              unrolled_visible_pairs=pairs_unrolled),
                tuning={b: {n: t._asdict() for n, t in zip(Tuning._fields, tunings[b])}
                        for b in backends})

  os.makedirs(args.out, exist_ok=True)
  times, skipped = {}, {}

  def save(completed: str) -> None:
    """Writes what is measured so far, so a run cut off by a time limit keeps it."""
    record.update(completed=completed, skipped=skipped,
                  times_ms={n: dict(fwd=f, fwd_bwd=fb) for n, (f, fb) in times.items()})
    with open(os.path.join(args.out, args.name), "w") as f:
      json.dump(record, f, indent=2)
    with open(os.path.join(args.out, args.name.replace(".json", "_log.txt")), "w") as f:
      f.write("\n".join(lines) + "\n")

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(key, (1, length, heads, dim), jnp.bfloat16) for key in keys)
  kv_end = jnp.asarray(kv_end_np)[None]

  if not args.skip_checks:
    record["check_small"] = {}
    record["check_benchmark_size"] = {}
    for backend in backends:
      if on_gpu:
        record["check_small"][backend] = attempt(check_small, backend, tunings, log)
      record["check_benchmark_size"][backend] = attempt(
          check_benchmark_size, tree_fn(kv_end, backend, tunings, interpret), q, k, v, do,
          kv_end, paths, args.check_heads, on_gpu, log)
      save(f"checks_{backend}")

  rate = matmul_tflops(256 if args.tiny else 8192)
  log(f"bf16 matmul: {rate:.1f} TFLOP/s (MFU {rate / PEAK_BF16_TFLOPS:.2f})")
  record.update(matmul_tflops=rate, matmul_mfu=rate / PEAK_BF16_TFLOPS)
  fwd_flops = 4 * heads * dim * pairs_tree
  for backend in backends:
    result = attempt(bench_attention, tree_fn(kv_end, backend, tunings, interpret), q, k, v, do)
    if isinstance(result, dict):
      skipped[f"tree_{backend}"] = result["error"]
    else:
      times[f"tree_{backend}"] = result
    log(f"tree kernel ({backend}): {result}")
    save(f"tree_{backend}")
  # Sweeps: each config against the first of its list (list the default first). Backward
  # first: a forward variant that hangs on the GPU then costs only the configs after it.
  record["sweep"] = sweep = []
  first = backends[0] if backends else "gpu"
  base = tunings[first]
  configs = [("fwd_bwd", text, base._replace(dq=parse_tiles(text.split("/")[0]),
                                             dkdv=parse_tiles(text.split("/")[1])))
             for text in args.sweep_bwd]
  configs += [("fwd", text, base._replace(fwd=parse_tiles(text))) for text in args.sweep_fwd]
  first_outputs = {}
  for kind, text, tuning in configs:
    attend = tree_fn(kv_end, first, {first: tuning}, interpret)
    if kind == "fwd":
      fn, inputs, entry = attend, (q, k, v), dict(fwd=text)
    else:
      fn = lambda q, k, v, do, attend=attend: jax.vjp(attend, q, k, v)[1](do)
      inputs, entry = (q, k, v, do), dict(zip(("dq", "dkdv"), text.split("/")))
    entry = dict(backend=first, **entry, **attempt(sweep_config, fn, inputs,
                                                   first_outputs.get(kind)))
    if "outputs" in entry:
      first_outputs.setdefault(kind, entry.pop("outputs"))
      entry[f"{kind}_ms"] = entry.pop("ms")
      if kind == "fwd_bwd" and f"tree_{first}" in times:  # same forward as the main timing
        entry["bwd_ms"] = entry["fwd_bwd_ms"] - times[f"tree_{first}"][0]
    sweep.append(entry)
    log(f"sweep {entry}")
    save(f"sweep {len(sweep)}/{len(configs)}")

  if on_gpu and not args.skip_peers:
    unrolled = [jnp.take(x[0], jnp.asarray(paths), axis=0) for x in (q, k, v, do)]
    times["cudnn_unrolled"] = bench_attention(cudnn_causal, *unrolled[:3], unrolled[3])
    record["stock_attention_mgpu_unrolled"] = bench_stock_mgpu(*unrolled, log)
    del unrolled
    flex = bench_flex(kv_end_np, heads, dim)
    if isinstance(flex, str):
      skipped["flex_tree"] = flex
    else:
      times["flex_tree"] = flex
  else:
    for name in ("cudnn_unrolled", "flex_tree", "stock_attention_mgpu_unrolled"):
      skipped[name] = "--skip-peers" if args.skip_peers else "needs a CUDA GPU"
  floor_fwd = fwd_flops / (rate * 1e12) * 1e3
  times["flop_floor"] = (floor_fwd, 3.5 * floor_fwd)  # bwd = 5 matmuls of the fwd's 2

  # Rates count useful work only: the tree's visible pairs for tree methods, the paths'
  # causal pairs for cuDNN on the unrolled paths.
  work = {name: fwd_flops for name in times}
  if "cudnn_unrolled" in times:
    work["cudnn_unrolled"] = 4 * heads * dim * pairs_unrolled
  save("peers")
  record.update(fwd_rates={n: rate_record(work[n], f, rate) for n, (f, _) in times.items()},
                fwd_bwd_rates={n: rate_record(3.5 * work[n], fb, rate)
                               for n, (_, fb) in times.items()})
  if "flex_tree" in times:
    record["speedup_vs_flex"] = {
        n: dict(fwd=times["flex_tree"][0] / times[n][0],
                fwd_bwd=times["flex_tree"][1] / times[n][1])
        for n in times if n.startswith("tree_")}
  record["causal_rows"] = bench_causal_rows(causal_lengths, heads, dim, backends, tunings,
                                            interpret, on_gpu, rate, log)
  log(f"{'method':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd MFU':>9}")
  for name, (f, fb) in times.items():
    log(f"{name:<18}{f:>10.3f}{fb:>12.3f}{record['fwd_rates'][name]['mfu_vs_peak']:>9.2f}")
  for name, reason in skipped.items():
    log(f"{name:<18} skipped: {reason}")
  save("all")
  return record


if __name__ == "__main__":
  main()
