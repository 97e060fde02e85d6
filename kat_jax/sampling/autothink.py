"""AutoThink control at generation time: let the model choose, or force a mode by prefilling.

The KAT generation prompt ends with `<judge>\\n` (docs/spec.md §7.2). The model writes a judge,
`</judge>`, and picks `<think_on>` or `<think_off>`. There is no switch in the template; a mode
is forced by prefilling the assistant turn through `<think_on>\\n<think>\\n` or
`<think_off>\\n<answer>\\n` (after a judge, empty by default), so the response still parses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.data.tokenizer import Tokenizer

THINK_MODES = ("auto", "on", "off")


def forced_mode_prefix(mode: str, judge: str = "") -> str:
  """Text appended after the KAT generation prompt (`...<judge>\\n`) to force `mode`."""
  if mode not in THINK_MODES:
    raise ValueError(f"think mode {mode!r} not in {THINK_MODES}")
  if mode == "auto":
    return ""
  head = f"{judge}\n</judge>\n\n"
  if mode == "on":
    return head + "<think_on>\n<think>\n"
  return head + "<think_off>\n<answer>\n"


def think_mode_prompts(tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], mode: str,
                       judge: str = "") -> list[list[int]]:
  """Appends the forced-mode prefill to each tokenized KAT prompt (ids end with `<judge>\\n`)."""
  suffix = tokenizer.encode(forced_mode_prefix(mode, judge))
  return [list(p) + suffix for p in prompts]


def autothink_stats(responses: Sequence[str], num_tokens: Sequence[int]) -> dict[str, Any]:
  """Think-on rate and tokens per response over KAT responses.

  Args:
    responses: decoded assistant text after the generation prompt (`<judge>\\n` implied), the
      forced prefill included when a mode was forced.
    num_tokens: generated tokens per response (the prefill excluded).

  Returns:
    {"responses", "think_on_rate", "think_off_rate", "no_mode_rate", "well_formed_rate",
     "tokens_per_response", "tokens_think_on", "tokens_think_off"} (per-mode means are None
    when that mode never occurs).
  """
  if len(responses) != len(num_tokens):
    raise ValueError(f"{len(responses)} responses but {len(num_tokens)} token counts")
  modes, well_formed = [], []
  for text in responses:
    parsed = parse_autothink_response(text, judge_prefilled=True)
    modes.append(parsed["mode"])
    well_formed.append(parsed["well_formed"])
  counts = np.asarray(num_tokens, np.float64)
  modes_arr = np.asarray(modes, object)
  total = max(len(responses), 1)

  def mean_for(mode):
    picked = counts[modes_arr == mode]
    return float(picked.mean()) if picked.size else None

  return {
      "responses": len(responses),
      "think_on_rate": sum(m == "think_on" for m in modes) / total,
      "think_off_rate": sum(m == "think_off" for m in modes) / total,
      "no_mode_rate": sum(m is None for m in modes) / total,
      "well_formed_rate": sum(well_formed) / total,
      "tokens_per_response": float(counts.mean()) if counts.size else 0.0,
      "tokens_think_on": mean_for("think_on"),
      "tokens_think_off": mean_for("think_off"),
  }
