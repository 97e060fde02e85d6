"""A kat_jax model as a generate function: KAT prompts in, responses and token counts out.

The one sampling path of evaluation, tagging and SFT evaluation (`autothink.generation.
kat_generate_fn` drops the counts). Counts come from the sampler: re-encoding decoded text
over-counts (a cut multi-byte character decodes to U+FFFD, three bytes). By default the
rollout engine generates every query of a call in one continuous batch (`sampler="paged"`);
`sampler="static"` runs the static Sampler in batches of `batch_size` (same greedy output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from kat_jax.data.chat_template import tokenize_chat
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.model.config import ModelConfig
from kat_jax.progress import Progress

CountingGenerateFn = Callable[[list[str]], tuple[list[str], list[int]]]


def model_generate_fn(params: Any, model_config: ModelConfig, tokenizer: Tokenizer, *,
                      think_mode: str = "auto", max_new_tokens: int = 256,
                      temperature: float = 0.0, batch_size: int = 64, seed: int = 0,
                      prefill_chunk: int = 512, sampler: str = "paged", page_size: int = 16,
                      num_pages: int | None = None) -> CountingGenerateFn:
  """queries -> (KAT responses after `<judge>\\n` with any forced prefill, [N] generated
  tokens without the stop token). think_mode: 'auto' | 'on' | 'off'; temperature 0 = greedy.
  batch_size: rows decoding at once (the engine's slots, or the static Sampler's batch);
  sampler, page_size, num_pages: as `kat_jax.sampling.make_batch_sampler` takes them."""
  # pylint: disable-next=g-import-not-at-top  (sampling pulls in the decode machinery)
  from kat_jax.sampling import (SamplingParams, forced_mode_prefix, make_batch_sampler,
                                prepare_params, think_mode_prompts)
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                     f"{max_new_tokens}")
  sampling = SamplingParams(temperature=temperature, vocab_limit=tokenizer.vocab_size)
  dparams = prepare_params(params, model_config)
  generator = make_batch_sampler(model_config, sampler, pad_id=tokenizer.pad_id,
                                 prefill_chunk=prefill_chunk, num_slots=batch_size,
                                 page_size=page_size, num_pages=num_pages)
  # The engine refills slots as responses end, so it takes all queries at once.
  per_call = batch_size if sampler == "static" else None
  prefix = forced_mode_prefix(think_mode)
  stops = set(tokenizer.stop_ids)
  state = {"rng": jax.random.key(seed)}

  def generate(prompts: list[str]) -> tuple[list[str], list[int]]:
    ids = [tokenize_chat(tokenizer, [{"role": "user", "content": p}],
                         add_generation_prompt=True, template="kat").ids for p in prompts]
    ids = think_mode_prompts(tokenizer, ids, think_mode)
    texts, counts = [], []
    progress = Progress("generating", len(ids), unit="responses")
    step = per_call or len(ids)
    for start in range(0, len(ids), step):
      state["rng"], key = jax.random.split(state["rng"])
      extra = {} if per_call else {"on_step": lambda n: progress.update(n - progress.done)}
      result = generator.generate(dparams, ids[start:start + step], key,
                                  max_new_tokens=max_new_tokens, sampling=sampling,
                                  stop_ids=tokenizer.stop_ids, **extra)
      token_lists = result.token_lists()
      for tokens in token_lists:
        kept = [t for t in tokens if t not in stops]
        texts.append(prefix + tokenizer.decode(kept))
        counts.append(len(kept))
      progress.update(start + len(token_lists) - progress.done)
    progress.finish()
    return texts, counts

  return generate
