"""The `generate` stage: prompts (JSONL or config) -> completions JSONL + AutoThink summary.

  python -m experiments.run --config experiments/configs/generate.py \\
      --config.generate.prompts_path=prompts.jsonl --config.model.init_from=runs/sft

`config.model.init_from` is any model source of `kat_jax.checkpoint.models` (HF directory,
run workdir, `<workdir>@<step>`, saved model); empty = a random init of `config.model`. A run
workdir brings its own tokenizer (the one it trained with); otherwise `config.data.tokenizer`.

Prompt rows: {"prompt": str} (one user turn) or {"messages": [...]} (ChatML messages), with an
optional "id". Outputs under `<workdir>/`: completions.jsonl (one row per sample: id, sample,
completion text, num_tokens, stopped, mode, mean log-prob and entropy) and
generate_summary.json (think-on rate, tokens per response, throughput).

`generate.sampler="paged"` (default) runs every prompt through the rollout engine at once
(`num_slots` rows decoding, a KV pool of `num_pages` pages of `page_size` tokens; 0 = sized
from the longest prompt); "static" runs the static Sampler `batch_size` prompts at a time.
Greedy outputs are the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.data.chat_template import TEMPLATES, parse_autothink_response, tokenize_chat
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.field_checks import at_least, check_section
from kat_jax.progress import status
from kat_jax.sampling.autothink import (THINK_MODES, autothink_stats, forced_mode_prefix,
                                        think_mode_prompts)
from kat_jax.sampling.forward import prepare_params
from kat_jax.sampling.engine import BATCH_SAMPLERS, make_batch_sampler
from kat_jax.sampling.logits import SamplingParams


def generate_fields() -> ConfigDict:
  """`config.generate` with its defaults."""
  return ConfigDict(dict(
      prompts_path="",  # JSONL with "prompt" or "messages" (+ optional "id") per line
      prompts=("What is 2 + 3?", "Write a haiku about the sea."),  # used when no path
      output="",  # default <workdir>/completions.jsonl
      template="kat",  # chat template: 'kat' or 'qwen2.5'
      think_mode="auto",  # 'auto' (model chooses), 'on' or 'off' (forced by prefill)
      judge="",  # judge text prefilled when forcing a mode
      num_samples=1,  # samples per prompt (one prefill, forked cache)
      max_new_tokens=128,
      temperature=0.7,  # 0 = greedy
      top_k=0,
      top_p=1.0,
      sampler="paged",  # 'paged' (rollout engine) or 'static' (Sampler, batch_size prompts)
      batch_size=8,  # static: prompts per call (rows = batch_size * num_samples)
      num_slots=64,  # paged: rows decoding at once
      page_size=16,  # paged: tokens per KV page
      num_pages=0,  # paged: KV pool size in pages; 0 = every slot at its longest request
      prefill_chunk=512,
  ))


def read_prompts(gen: ConfigDict) -> list[dict[str, Any]]:
  """Prompt rows [{"id", "messages"}] from `prompts_path` or the inline `prompts`."""
  if gen.prompts_path:
    if not os.path.exists(gen.prompts_path):
      raise ConfigError(f"config.generate.prompts_path: file not found: {gen.prompts_path}")
    with open(gen.prompts_path, encoding="utf-8") as f:
      raw = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for lineno, line in raw:
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{gen.prompts_path}:{lineno}: not JSON ({e})") from e
      rows.append(_prompt_row(row, f"{gen.prompts_path}:{lineno}", len(rows)))
  else:
    rows = [_prompt_row({"prompt": p}, f"config.generate.prompts[{i}]", i)
            for i, p in enumerate(gen.prompts)]
  if not rows:
    raise ConfigError("config.generate: no prompts (set prompts_path or prompts)")
  return rows


def _prompt_row(row: Any, where: str, index: int) -> dict[str, Any]:
  if not isinstance(row, Mapping):
    raise ConfigError(f"{where}: a prompt row must be a JSON object")
  if isinstance(row.get("messages"), list):
    messages = row["messages"]
  elif isinstance(row.get("prompt"), str):
    messages = [{"role": "user", "content": row["prompt"]}]
  else:
    raise ConfigError(f"{where}: needs a str field 'prompt' or a list field 'messages'")
  return {"id": row.get("id", index), "messages": messages}


def _check(gen: ConfigDict, vocab_limit: int) -> SamplingParams:
  if gen.template not in TEMPLATES:
    raise ConfigError(f"config.generate.template {gen.template!r} not in {TEMPLATES}")
  if gen.think_mode not in THINK_MODES:
    raise ConfigError(f"config.generate.think_mode {gen.think_mode!r} not in {THINK_MODES}")
  if gen.think_mode != "auto" and gen.template != "kat":
    raise ConfigError("config.generate.think_mode 'on'/'off' needs template 'kat'")
  if gen.sampler not in BATCH_SAMPLERS:
    raise ConfigError(f"config.generate.sampler {gen.sampler!r} not in {BATCH_SAMPLERS}")
  check_section(gen, "generate", {name: at_least(1) for name in (
      "num_samples", "max_new_tokens", "batch_size", "prefill_chunk", "num_slots", "page_size")})
  if gen.num_pages != 0 and gen.num_pages < 2:
    raise ConfigError(f"config.generate.num_pages must be 0 (sized per call) or >= 2 (page 0 "
                      f"is scratch), got {gen.num_pages}")
  try:
    return SamplingParams(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                          vocab_limit=vocab_limit)
  except ValueError as e:
    raise ConfigError(f"config.generate: {e}") from e


def tokenize_prompts(tokenizer: Tokenizer, rows: Sequence[Mapping[str, Any]],
                     gen: ConfigDict) -> list[list[int]]:
  """Chat-rendered prompt ids with the generation prompt and any forced think-mode prefill."""
  ids = [tokenize_chat(tokenizer, r["messages"], add_generation_prompt=True,
                       template=gen.template).ids for r in rows]
  return think_mode_prompts(tokenizer, ids, gen.think_mode, gen.judge)


def run_generate(config: ConfigDict) -> dict[str, Any]:
  """Generates completions for every prompt; returns the summary dict."""
  gen = config.generate
  source = config.model.init_from or models.config_from_model_fields(config.model)
  tokenizer = get_tokenizer(models.tokenizer_name(source, config.data.tokenizer,
                                                  what="config.model.init_from"))
  sampling = _check(gen, tokenizer.vocab_size)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  rows = read_prompts(gen)
  model_config, params = models.load_configured_model(config.model, seed=config.seed,
                                                      tokenizer=tokenizer)
  dparams = prepare_params(params, model_config)
  del params
  sampler = make_batch_sampler(model_config, gen.sampler, pad_id=tokenizer.pad_id,
                               prefill_chunk=gen.prefill_chunk, num_slots=gen.num_slots,
                               page_size=gen.page_size, num_pages=gen.num_pages or None)
  # The engine refills slots as samples end, so it takes every prompt in one call.
  per_call = gen.batch_size if gen.sampler == "static" else len(rows)
  prompts = tokenize_prompts(tokenizer, rows, gen)
  prefix = forced_mode_prefix(gen.think_mode, gen.judge)
  output = gen.output or os.path.join(workdir, "completions.jsonl")
  rng = jax.random.key(config.seed)
  texts, counts = [], []
  start = time.perf_counter()
  with open(output, "w", encoding="utf-8") as out:
    for first in range(0, len(rows), per_call):
      batch_rows = rows[first:first + per_call]
      batch_prompts = prompts[first:first + per_call]
      rng, key = jax.random.split(rng)
      try:
        result = sampler.generate(dparams, batch_prompts, key,
                                  max_new_tokens=gen.max_new_tokens, sampling=sampling,
                                  stop_ids=tokenizer.stop_ids, num_samples=gen.num_samples)
      except ValueError as e:  # a prompt the engine cannot hold (positions, num_pages)
        raise ConfigError(f"config.generate: {e}") from e
      tokens = result.token_lists()
      logprobs, entropies = np.asarray(result.logprobs), np.asarray(result.entropies)
      stopped = np.asarray(result.stopped)
      for i, ids in enumerate(tokens):
        row = batch_rows[i // gen.num_samples]
        text = tokenizer.decode([t for t in ids if t not in tokenizer.stop_ids])
        n = len(ids)
        texts.append(prefix + text)
        counts.append(n)
        record = {"id": row["id"], "sample": i % gen.num_samples, "completion": prefix + text,
                  "num_tokens": n, "stopped": bool(stopped[i]),
                  "mean_logprob": float(logprobs[i, :n].mean()) if n else 0.0,
                  "mean_entropy": float(entropies[i, :n].mean()) if n else 0.0}
        if gen.template == "kat":
          record["mode"] = parse_autothink_response(prefix + text, judge_prefilled=True)["mode"]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
  elapsed = time.perf_counter() - start
  summary = {"prompts": len(rows), "completions": len(texts), "output": output,
             "think_mode": gen.think_mode, "seconds": elapsed,
             "generated_tokens_per_s": sum(counts) / max(elapsed, 1e-9),
             **autothink_stats(texts, counts)}
  with open(os.path.join(workdir, "generate_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  status(f"generate: {len(texts)} completions -> {output}; think-on rate "
         f"{summary['think_on_rate']:.2f}, {summary['tokens_per_response']:.1f} tokens/response")
  return summary
