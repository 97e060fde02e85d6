"""Batch-1 decode with the per-product kernels vs one kernel per layer, both compiled in one
process and timed alternately (cross-process timings of the same step vary ~15% on the H200).

  python3 benchmarks/decode_layer_ab.py --out benchmarks/results/sampler_h200_layer_vs_fused_interleaved.json
"""
import argparse, json, os, time
import numpy as np, jax
from concurrent.futures import ThreadPoolExecutor
from kat_jax.model import get_preset, init_params
from kat_jax.sampling import GREEDY, Sampler, prepare_params
import kat_jax.kernels.decode_layer as dl
parser = argparse.ArgumentParser(); parser.add_argument("--out", required=True)
args_cli = parser.parse_args()
dl.LAYER_TILES.update(qkv=8, o=4, gate_up=4, down=1)
config = get_preset("qwen2.5-1.5b", dtype="bfloat16", param_dtype="bfloat16")
dparams = jax.block_until_ready(prepare_params(jax.jit(lambda r: init_params(config, r))(jax.random.key(0)), config))
prompt = np.random.default_rng(0).integers(0, 150000, (1, 128)).tolist()
samplers = {k: Sampler(config, prefill_chunk=128, kernels=k) for k in ("fused", "layer")}
def run(k, decode=True):
  s = samplers[k]
  st = s.prefill(dparams, prompt, max_length=256)
  if decode:
    r, st = s.decode(dparams, st, jax.random.key(0), max_new_tokens=128, sampling=GREEDY)
    return jax.block_until_ready(r)
  return jax.block_until_ready(st)
with ThreadPoolExecutor(2) as pool:
  outs = list(pool.map(run, samplers))
same = outs[0].token_lists() == outs[1].token_lists()
times = {k: {"total": [], "prefill": []} for k in samplers}
for rep in range(5):
  for k in samplers:
    t = time.perf_counter(); run(k, False); times[k]["prefill"].append(time.perf_counter() - t)
    t = time.perf_counter(); run(k); times[k]["total"].append(time.perf_counter() - t)
res = {k: dict(ms_per_token=(np.median(v["total"]) - np.median(v["prefill"])) / 128 * 1e3, **v) for k, v in times.items()}
for k, v in res.items():
  print(k, round(v["ms_per_token"], 4), [round(x * 1e3, 1) for x in v["total"]])
print("same greedy tokens:", same)
json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layer_tiles=dict(dl.LAYER_TILES),
               method="one process, both samplers compiled, 5 alternating repeats of prefill (128) and prefill+decode (128 new, greedy); ms/token = (median total - median prefill)/128",
               same_greedy_tokens=same, results=res), open(args_cli.out, "w"), indent=1)
