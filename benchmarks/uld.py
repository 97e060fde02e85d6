"""Benchmark: ULD distance, exact sort vs top-k, on one chunk of Qwen2.5-sized logits.

Workload: 4096 tokens x 151,665 vocabulary (Qwen2.5's real range), bf16 student and teacher
logits (a peaked, Zipf-like distribution: logits = -1.5*log(1+rank) + noise, teacher = student +
noise, so top tokens overlap as in real distillation). For exact and k in {256, 1024, 4096}:
forward time, forward+backward time (gradient w.r.t. the student logits), mean ULD and its
relative error against exact, max per-token absolute error, and the tail mass the top-k drops.

  PYTHONPATH=$PWD python3 benchmarks/uld.py --out $OUT       (GPU)
  PYTHONPATH=$PWD python3 benchmarks/uld.py --tokens 64 --vocab 4096 --ks 16,64   (CPU smoke)

No grain / ml_collections imports: it runs on the bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from kat_jax.distill.losses import sorted_probs, uld


def make_logits(tokens: int, vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """(student, teacher) bf16 logits [tokens, vocab] with Zipf-like peaked distributions."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  ranks = jax.vmap(lambda k: jax.random.permutation(k, vocab))(jax.random.split(k1, tokens))
  base = -1.5 * jnp.log1p(ranks.astype(jnp.float32))  # p ~ rank^-1.5
  student = base + jax.random.normal(k2, base.shape)
  teacher = base + 1.5 * jax.random.normal(k3, base.shape)
  return student.astype(jnp.bfloat16), teacher.astype(jnp.bfloat16)


def timed(fn, *args, repeats: int) -> tuple[float, list[float]]:
  """(compile+first call seconds, steady-state seconds of each repeat)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, times


def bench(tokens: int, vocab: int, ks: list[int], repeats: int) -> dict:
  student, teacher = make_logits(tokens, vocab)
  rows = []
  exact_per_token = None
  for k in [None] + ks:
    fwd = jax.jit(lambda s, t, k=k: uld(s, t, top_k=k))
    fwd_bwd = jax.jit(jax.value_and_grad(lambda s, t, k=k: jnp.mean(uld(s, t, top_k=k))))
    compile_fwd, t_fwd = timed(fwd, student, teacher, repeats=repeats)
    _, t_bwd = timed(fwd_bwd, student, teacher, repeats=repeats)
    per_token = fwd(student, teacher)
    if k is None:
      exact_per_token = per_token
    tail = jnp.zeros(())
    if k is not None:
      tail = jnp.mean(1.0 - jnp.sum(sorted_probs(teacher, top_k=k), axis=-1))
    mean = float(jnp.mean(per_token))
    rows.append({
        "variant": "exact" if k is None else f"top_k={k}",
        "k": k,
        "fwd_ms": 1e3 * statistics.median(t_fwd),
        "fwd_bwd_ms": 1e3 * statistics.median(t_bwd),
        "first_call_s": compile_fwd,
        "mean_uld": mean,
        "rel_err_vs_exact": abs(mean - float(jnp.mean(exact_per_token)))
                            / float(jnp.mean(exact_per_token)),
        "max_abs_err_per_token": float(jnp.max(jnp.abs(per_token - exact_per_token))),
        "teacher_tail_mass_dropped": float(tail),
    })
  return {"tokens": tokens, "vocab": vocab, "dtype": "bfloat16", "rows": rows}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=151665)
  parser.add_argument("--ks", default="256,1024,4096")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  ks = [int(k) for k in args.ks.split(",") if k]
  result = bench(args.tokens, args.vocab, ks, args.repeats)
  result.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version(),
                command=f"PYTHONPATH=$PWD python3 benchmarks/uld.py --tokens {args.tokens} "
                        f"--vocab {args.vocab} --ks {args.ks} --repeats {args.repeats}")
  print(f"ULD on {args.tokens} x {args.vocab} bf16 logits, {result['device']}")
  print(f"{'variant':>12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'mean ULD':>10} "
        f"{'rel err':>9} {'max|err|':>9} {'tail':>8}")
  for r in result["rows"]:
    print(f"{r['variant']:>12} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} "
          f"{r['mean_uld']:10.5f} {r['rel_err_vs_exact']:9.2e} "
          f"{r['max_abs_err_per_token']:9.2e} {r['teacher_tail_mass_dropped']:8.4f}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"uld_{jax.default_backend()}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
  main()
