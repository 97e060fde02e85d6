"""One decoder layer as one kernel (kat_jax.kernels.decode_layer) at several tilings vs the six
per-product decode kernels: XProf kernel time and theoretical occupancy, Qwen2.5-1.5B, batch 1.

  python3 benchmarks/decode_layer_sweep.py --out benchmarks/results/decode_layer_kernel_h200_tiles.json
"""
import argparse, json, os, re, sys, tempfile, glob
from collections import defaultdict
import jax, jax.numpy as jnp
from jax.profiler import ProfileData
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))
from test_decode_layer import _layer_inputs
from kat_jax.kernels.decode import fused_matvec, decode_attention
from kat_jax.kernels.decode_layer import decode_layer, layer_counters, decode_layer_reference
from kat_jax.testing import relative_error
parser = argparse.ArgumentParser(); parser.add_argument("--out", required=True)
args_cli = parser.parse_args()
b, d, f, hq, hkv, hd, S, end = 1, 1536, 8960, 12, 2, 128, 256, 200
h, layer, cos, sin, kc, vc, valid = _layer_inputs(1, b, d, f, hq, hkv, hd, S, end, jnp.bfloat16)
want = decode_layer_reference(h, layer, cos, sin, kc, vc, valid, jnp.int32(end), num_q_heads=hq, eps=1e-6)

def six(h, layer, cos, sin, kc, vc, valid, end):
  qkv = fused_matvec(h, layer["qkv"], norm_scale=layer["input_norm"], eps=1e-6, bias=layer["qkv_bias"], block_n=8, num_warps=4)
  out, kc, vc = decode_attention(qkv, cos, sin, kc, vc, valid, end, num_q_heads=hq)
  h = fused_matvec(out, layer["o"], residual=h, block_n=4, num_warps=8)
  act = fused_matvec(h, layer["gate_up"], norm_scale=layer["post_attn_norm"], eps=1e-6, swiglu=True, block_n=8, num_warps=4)
  return fused_matvec(act, layer["down"], residual=h, block_n=4, num_warps=8), kc, vc

variants = {"six": None,
  "q8_o4_gu4_d1_w4": dict(qkv=8, o=4, gate_up=4, down=1),
  "q4_o4_gu4_d1_w4": dict(qkv=4, o=4, gate_up=4, down=1),
  "q4_o2_gu2_d1_w4": dict(qkv=4, o=2, gate_up=2, down=1),
  "q8_o4_gu2_d1_w4": dict(qkv=8, o=4, gate_up=2, down=1),
  "q8_o4_gu8_d2_w8": dict(qkv=8, o=4, gate_up=8, down=2, num_warps=8),
  "q8_o4_gu4_d2_w8": dict(qkv=8, o=4, gate_up=4, down=2, num_warps=8),
  "q16_o8_gu8_d4_w8": dict(qkv=16, o=8, gate_up=8, down=4, num_warps=8)}
args = (h, layer, cos, sin, kc, vc, valid, jnp.int32(end))
results = {}
for name, tiles in variants.items():
  try:
    if tiles is None:
      fn = jax.jit(six)
    else:
      fn = jax.jit(lambda *a, t=tiles: decode_layer(*a, layer_counters(1, b, hq), layer_index=0, num_q_heads=hq, eps=1e-6, tiles=t))
    r = jax.block_until_ready(fn(*args))
    check = {"rel_err_h": float(relative_error(r[0], want[0]))}
    if tiles is not None:
      check["timed_out"] = int(r[3][0, 4])
    tdir = tempfile.mkdtemp()
    with jax.profiler.trace(tdir):
      for _ in range(20):
        r = fn(*args)
      jax.block_until_ready(r)
    prof = ProfileData.from_file(glob.glob(os.path.join(tdir, "**", "*.xplane.pb"), recursive=True)[0])
    kern = defaultdict(list); occ = {}
    for p in prof.planes:
      if not re.match(r"/device:GPU:0$", p.name): continue
      for line in p.lines:
        if not line.name.startswith("Stream"): continue
        for e in line.events:
          if re.search("decode|matvec", e.name):
            kern[e.name].append(e.duration_ns / 1e3)
            occ.setdefault(e.name, dict(e.stats).get("theoretical_occupancy_pct"))
    per_kernel = {k: dict(mean_us=sum(v) / len(v), occupancy_pct=occ[k]) for k, v in kern.items()}
    total = sum(v["mean_us"] for v in per_kernel.values())
    results[name] = dict(tiles=tiles, layer_us=total, kernels=per_kernel, **check)
    print(f"{name:20s} {total:7.2f} us/layer  {check}  occ {[per_kernel[k]['occupancy_pct'] for k in per_kernel]}", flush=True)
  except Exception as e:  # a tile that does not compile is a result too
    results[name] = dict(tiles=tiles, error=str(e)[:300])
    print(name, "ERROR", str(e)[:200], flush=True)
ok = {k: v for k, v in results.items() if k != "six" and "layer_us" in v and v["timed_out"] == 0 and v["rel_err_h"] < 1e-2}
best = min(ok, key=lambda k: ok[k]["layer_us"])
json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shapes="qwen2.5-1.5b layer, bf16, batch 1, 256 slots, end 200",
               method="XProf kernel durations, mean of 20 calls after a warm-up; six = the per-product kernels (decode_attention's two kernels included)",
               results=results, best_layer=best), open(args_cli.out, "w"), indent=1)
print("best", best)
