"""Decode throughput of the KV-cache sampler vs HF transformers `generate` vs the bandwidth floor.

  PYTHONPATH=$PWD python benchmarks/sampler.py --out $OUT/sampler_h100.json

Random bf16 weights of a preset (default qwen2.5-1.5b), greedy, fixed prompt / new-token
lengths, no stop tokens (every row makes `--new_tokens`). For each batch size it reports:

- time per output token: ours = the decode call alone (after a prefill that is waited for) /
  new_tokens; HF = (generate time - prefill time) / new_tokens (ours runs new_tokens forwards
  in its loop, HF new_tokens - 1: a conservative comparison); ours by HF's method is recorded
  too (`generate_minus_prefill_ms_per_token`);
- decode tokens/s = batch / time per output token;
- the bandwidth floor of one decode step = (weight bytes + KV bytes read at the mean context)
  / device copy bandwidth, the copy bandwidth measured in the same run (bytes read + written).

Imports no grain / ml_collections (absent on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2.5-1.5b")
  parser.add_argument("--batch_sizes", default="1,16,64,256")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hf_repeats", type=int, default=2)
  parser.add_argument("--skip_hf", action="store_true")
  parser.add_argument("--kernels", default="auto",
                      help="the sampler's decode-step kernels: auto, xla or fused")
  parser.add_argument("--trace_batch", type=int, default=0,
                      help="also record an XProf trace of one decode at this batch size and "
                           "summarise its GPU kernels per decode step")
  parser.add_argument("--compiler_option", action="append", default=[], metavar="NAME=VALUE",
                      help="an XLA option for the sampler's decode loop (repeatable; replaces "
                           "the Sampler's GPU defaults), e.g. "
                           "xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUSTOM_CALL")
  parser.add_argument("--tiles", default="",
                      help="a benchmarks/decode_kernels.py JSON: the fused step uses the fastest "
                           "matvec tiling it measured for each product")
  parser.add_argument("--out", default="")
  return parser.parse_args()


def _compiler_options(pairs: list[str]) -> dict[str, str] | None:
  """NAME=VALUE pairs -> options; None (the Sampler's defaults) when there are none."""
  if not pairs:
    return None
  options = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--compiler_option takes NAME=VALUE, got {pair!r}")
    options[name] = value
  return options


def use_measured_tiles(path: str) -> dict:
  """Sets `kat_jax.sampling.forward.DECODE_TILES` from the best tilings in a kernel sweep."""
  from kat_jax.sampling import forward  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as fh:
    sweep = json.load(fh)
  for row in sweep["matvec"]:
    if row.get("best"):
      forward.DECODE_TILES[row["name"]] = {k: v for k, v in row["best"].items()
                                           if k not in ("us", "fraction_of_copy")}
  return dict(forward.DECODE_TILES)


def copy_bandwidth(torch, device: str) -> float:
  """Device-to-device copy of 1 GiB: (bytes read + bytes written) / median time, bytes/s."""
  n = (1 << 30) // 2
  src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
  dst = torch.empty_like(src)
  times = []
  for i in range(25):
    if device == "cuda":
      start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      dst.copy_(src)
      stop.record()
      torch.cuda.synchronize()
      if i >= 5:
        times.append(start.elapsed_time(stop) / 1e3)
    else:
      t0 = time.perf_counter()
      dst.copy_(src)
      if i >= 5:
        times.append(time.perf_counter() - t0)
  assert torch.equal(dst, src)
  return 2 * src.numel() * src.element_size() / statistics.median(times)


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _prompts(config, batch_sizes, prompt_len) -> dict[int, list[list[int]]]:
  """Fixed random prompts per batch size (the same for every sampler of a run)."""
  rng = np.random.default_rng(0)
  return {b: rng.integers(0, 150000 if config.vocab_size > 150000 else config.vocab_size,
                          (b, prompt_len)).tolist() for b in batch_sizes}


def _generate(sampler, dparams, prompt, max_length: int, new_tokens: int | None):
  """Prefill `prompt`, then (unless new_tokens is None) greedy-decode new_tokens; blocks."""
  import jax  # pylint: disable=g-import-not-at-top
  state = jax.block_until_ready(sampler.prefill(dparams, prompt, max_length=max_length))
  return state if new_tokens is None else _decode(sampler, dparams, state, new_tokens)


def _decode(sampler, dparams, state, new_tokens: int):
  """Greedy-decode new_tokens from a prefilled `state`; blocks; the GenerationResult."""
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import GREEDY  # pylint: disable=g-import-not-at-top
  result, _ = sampler.decode(dparams, state, jax.random.key(0), max_new_tokens=new_tokens,
                             sampling=GREEDY)
  return jax.block_until_ready(result)


def bench_ours(config, params, batch_sizes, prompt_len, new_tokens, repeats, trace_batch=0,
               kernels="auto", compiler_options=None):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top

  from kat_jax.model import Decoder  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import Sampler, prepare_params  # pylint: disable=g-import-not-at-top
  from kat_jax.testing import relative_error  # pylint: disable=g-import-not-at-top

  sampler_args = dict(prefill_chunk=max(prompt_len, 8), kernels=kernels)
  sampler = Sampler(config, compiler_options=compiler_options, **sampler_args)
  dparams = jax.block_until_ready(prepare_params(params, config))
  max_length = prompt_len + new_tokens
  prompts = _prompts(config, batch_sizes, prompt_len)

  def prefill(b):
    return _generate(sampler, dparams, prompts[b], max_length, None)

  def run(b):
    return _generate(sampler, dparams, prompts[b], max_length, new_tokens)

  t0 = time.perf_counter()
  with ThreadPoolExecutor(len(batch_sizes)) as pool:  # compile all shapes concurrently
    list(pool.map(run, batch_sizes))
  compile_s = time.perf_counter() - t0

  # Sanity: prefill logits equal the training forward's (bf16 tolerance).
  check_b = min(batch_sizes)
  try:
    state = prefill(check_b)
    full = Decoder(config).apply({"params": params}, jnp.asarray(prompts[check_b]))[:, -1]
    logits_err = relative_error(state.logits, full.astype(jnp.float32))
    del state
  except Exception as e:  # pylint: disable=broad-except  # a failed check must not cost the run
    logits_err = f"check failed: {e!r}"[:300]

  rows = {}
  for b in batch_sizes:
    prefill_s = _median_time(lambda: prefill(b), repeats)
    results = []
    total_s = _median_time(lambda: results.append(run(b)), repeats)
    assert int(np.asarray(results[-1].mask).sum()) == b * new_tokens
    decode_s = []
    for _ in range(repeats):  # the decode call alone, after a prefill that is waited for
      state = prefill(b)
      t0 = time.perf_counter()
      _decode(sampler, dparams, state, new_tokens)
      decode_s.append(time.perf_counter() - t0)
    per_token = statistics.median(decode_s) / new_tokens
    rows[b] = {"generate_s": total_s, "prefill_s": prefill_s, "decode_s": decode_s,
               "time_per_token_ms": per_token * 1e3, "decode_tokens_per_s": b / per_token,
               "generate_minus_prefill_ms_per_token": (total_s - prefill_s) / new_tokens * 1e3}
  meta = {"compile_s": compile_s, "prefill_logits_rel_err_vs_decoder": logits_err,
          "kernels": sampler.kernels,
          "compiler_options": sampler.compiler_options}
  if trace_batch:
    # Each step's kernels are visible to the profiler only outside a while-loop command
    # buffer (inside one it records the first step), so the trace runs with XLA's defaults.
    traced = Sampler(config, compiler_options={}, **sampler_args)
    meta["trace"] = trace_decode(traced, dparams, prompts, trace_batch, max_length, new_tokens)
    meta["trace"]["compiler_options"] = traced.compiler_options
  return rows, meta


def trace_decode(sampler, dparams, prompts, batch, max_length, new_tokens) -> dict:
  """XProf trace of one decode (prefill done before): GPU kernel time and count per step.

  Run it with a Sampler whose loop is not one command buffer (compiler_options={}): inside a
  WHILE command buffer the profiler sees only the first step. `span / step` is an upper
  bound; `busy / step` is the kernel time a step needs without launch gaps.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import GREEDY  # pylint: disable=g-import-not-at-top
  from kat_jax.train.profiling import find_trace_file, format_summary, summarize_trace  # pylint: disable=g-import-not-at-top

  if batch not in prompts:
    raise ValueError(f"--trace_batch {batch} is not one of --batch_sizes")
  trace_dir = tempfile.mkdtemp(prefix="decode_trace_")
  state = jax.block_until_ready(sampler.prefill(dparams, prompts[batch], max_length=max_length))
  with jax.profiler.trace(trace_dir):
    result, _ = sampler.decode(dparams, state, jax.random.key(0), max_new_tokens=new_tokens,
                               sampling=GREEDY)
    jax.block_until_ready(result)
  summary = summarize_trace(find_trace_file(trace_dir), top=40)
  print(f"decode trace, batch {batch}, {new_tokens} steps:\n{format_summary(summary, top=40)}")
  summary.update(batch=batch, steps=new_tokens,
                 busy_ms_per_step=summary["busy_ms"] / new_tokens,
                 span_ms_per_step=summary["span_ms"] / new_tokens,
                 kernels_per_step=summary["events"] / new_tokens)
  return summary


def bench_hf(config, batch_sizes, prompt_len, new_tokens, repeats, device):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf_config = transformers.Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
      max_position_embeddings=config.max_position_embeddings,
      tie_word_embeddings=config.tie_word_embeddings, attn_implementation="sdpa")
  with torch.device(device):
    model = transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).eval()
  rng = np.random.default_rng(0)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  rows = {}
  for b in batch_sizes:
    ids = torch.as_tensor(rng.integers(0, min(config.vocab_size, 150000), (b, prompt_len)),
                          device=device)
    mask = torch.ones_like(ids)

    def generate(n):
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
      sync()
      return out

    def prefill():
      with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=True)
      sync()

    generate(4)  # warm-up
    prefill_s = _median_time(prefill, repeats + 1)
    outs = []
    total_s = _median_time(lambda: outs.append(generate(new_tokens)), repeats)
    assert outs[-1].shape == (b, prompt_len + new_tokens)
    per_token = (total_s - prefill_s) / new_tokens
    rows[b] = {"generate_s": total_s, "prefill_s": prefill_s,
               "time_per_token_ms": per_token * 1e3, "decode_tokens_per_s": b / per_token}
  del model
  return rows, {"transformers": transformers.__version__, "attn_implementation": "sdpa",
                "cache": "default (dynamic)"}


def main():
  args = _parse()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave room for torch
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from kat_jax.model import get_preset, init_params  # pylint: disable=g-import-not-at-top

  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  tiles = use_measured_tiles(args.tiles) if args.tiles else None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  config = get_preset(args.preset, dtype="bfloat16", param_dtype="bfloat16")
  params = init_params(config, jax.random.key(0))
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bandwidth = copy_bandwidth(torch, device)

  mean_context = args.prompt_len + args.new_tokens / 2

  def floor_ms(b):
    kv_bytes = 2 * config.num_layers * b * mean_context * config.num_kv_heads * config.head_dim * 2
    return (weight_bytes + kv_bytes) / bandwidth * 1e3, kv_bytes

  base_report = {
      "device": str(jax.devices()[0].device_kind) if jax.devices() else "?",
      "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "preset": args.preset, "dtype": "bfloat16", "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens, "sampling": "greedy, no stop tokens",
      "copy_bandwidth_bytes_per_s": bandwidth,
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "torch": torch.__version__},
  }
  ours, ours_meta = bench_ours(config, params, batch_sizes, args.prompt_len, args.new_tokens,
                               args.repeats, args.trace_batch, args.kernels,
                               _compiler_options(args.compiler_option))
  if tiles:
    ours_meta["decode_tiles"] = tiles
  del params
  hf, hf_meta = ({}, {"skipped": True}) if args.skip_hf else bench_hf(
      config, batch_sizes, args.prompt_len, args.new_tokens, args.hf_repeats, device)

  rows = []
  for b in batch_sizes:
    floor, kv_bytes = floor_ms(b)
    row = {"batch": b, "ours": ours[b], "hf": hf.get(b), "floor_ms": floor,
           "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes,
           "ours_over_floor": ours[b]["time_per_token_ms"] / floor}
    if b in hf:
      row["speedup_vs_hf"] = hf[b]["time_per_token_ms"] / ours[b]["time_per_token_ms"]
    rows.append(row)

  print(f"\n{args.preset} bf16, prompt {args.prompt_len}, new {args.new_tokens}, greedy; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; compile {ours_meta['compile_s']:.0f}s; "
        f"prefill logits rel err {ours_meta['prefill_logits_rel_err_vs_decoder']}")
  print(f"{'batch':>5} {'ours ms/tok':>11} {'ours tok/s':>10} {'HF ms/tok':>9} {'HF tok/s':>9} "
        f"{'floor ms':>8} {'ours/floor':>10} {'vs HF':>6}")
  for r in rows:
    hf_ms = r["hf"]["time_per_token_ms"] if r["hf"] else float("nan")
    hf_tps = r["hf"]["decode_tokens_per_s"] if r["hf"] else float("nan")
    print(f"{r['batch']:>5} {r['ours']['time_per_token_ms']:>11.3f} "
          f"{r['ours']['decode_tokens_per_s']:>10.0f} {hf_ms:>9.3f} {hf_tps:>9.0f} "
          f"{r['floor_ms']:>8.3f} {r['ours_over_floor']:>10.2f} "
          f"{r.get('speedup_vs_hf', float('nan')):>6.1f}")

  report = {
      **base_report,
      "versions": {**base_report["versions"],
                   **{k: v for k, v in hf_meta.items() if k == "transformers"}},
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "ours_meta": ours_meta, "hf_meta": hf_meta,
      "rows": rows,
  }
  _write(args.out, report)


def _write(path: str, report: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
