"""A small procedural dual-regime (think-on / think-off) chat dataset, byte-tokenizer sized.

Records (KAT report §3.2, stage 1)::

  {"messages": [{"role": "user", "content": q},
                {"role": "assistant", "content": "<think_on>\\n<think>\\n...\\n</think>\\n"
                                                 "<answer>\\n...\\n</answer>"}],
   "mode": "think_on" | "think_off", "domain": "math" | "string", "difficulty": "easy" | "hard"}

Hard queries get a step-by-step think block (think_on); easy ones answer directly (think_off).
In stage 1 the mode trigger (`<think_on>` / `<think_off>`, one token in both tokenizers) is
supplied with the input and excluded from the loss: `dual_regime_document` zeroes its weight.

The full AutoThink generator lives in `kat_jax.autothink.tasks`; its records can be fed here
unchanged as long as they carry `messages` whose last assistant turn starts with the trigger.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np

from kat_jax.data import chat_template
from kat_jax.data.packing import Document
from kat_jax.data.tokenizer import Tokenizer, kat_tag_ids

MODES = ("think_on", "think_off")
SYSTEM_PROMPT = "Answer."  # short: the byte tokenizer spends one token per character


def _add_easy(rng: random.Random) -> tuple[str, str]:
  a, b = rng.randint(1, 9), rng.randint(1, 9)
  return f"What is {a}+{b}?", str(a + b)


def _add_hard(rng: random.Random) -> tuple[str, str, str]:
  a, b = rng.randint(10, 99), rng.randint(10, 99)
  ones = a % 10 + b % 10
  carry = ones // 10
  tens = a // 10 + b // 10 + carry
  think = (f"{a % 10}+{b % 10}={ones}, write {ones % 10} carry {carry}. "
           f"{a // 10}+{b // 10}+{carry}={tens}. So {a + b}.")
  return f"What is {a}+{b}?", think, str(a + b)


def _mul_hard(rng: random.Random) -> tuple[str, str, str]:
  a, b = rng.randint(11, 49), rng.randint(2, 9)
  think = f"{a}*{b}={a // 10 * 10}*{b}+{a % 10}*{b}={a // 10 * 10 * b}+{a % 10 * b}={a * b}."
  return f"What is {a}*{b}?", think, str(a * b)


_LETTERS = "abcdefghij"


def _word(rng: random.Random, n: int) -> str:
  return "".join(rng.choice(_LETTERS) for _ in range(n))


def _reverse_easy(rng: random.Random) -> tuple[str, str]:
  w = _word(rng, rng.randint(2, 4))
  return f"Reverse {w}.", w[::-1]


def _sort_hard(rng: random.Random) -> tuple[str, str, str]:
  w = _word(rng, rng.randint(4, 6))
  think = " ".join(f"{c}" for c in sorted(w))
  return f"Sort {w}.", f"In order: {think}.", "".join(sorted(w))


_EASY: list[tuple[str, Callable]] = [("math", _add_easy), ("string", _reverse_easy)]
_HARD: list[tuple[str, Callable]] = [("math", _add_hard), ("math", _mul_hard),
                                     ("string", _sort_hard)]


def assistant_content(mode: str, answer: str, think: str | None = None) -> str:
  """Stage-1 assistant text: trigger, optional think block, answer block."""
  if mode == "think_on":
    return f"<think_on>\n<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"
  if mode == "think_off":
    return f"<think_off>\n<answer>\n{answer}\n</answer>"
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def make_record(rng: random.Random, think_on_fraction: float = 0.35) -> dict[str, Any]:
  """One record; hard (think_on) with probability `think_on_fraction` (KAT: 34.8%)."""
  if rng.random() < think_on_fraction:
    domain, task = rng.choice(_HARD)
    question, think, answer = task(rng)
    mode, difficulty = "think_on", "hard"
  else:
    domain, task = rng.choice(_EASY)
    (question, answer), think = task(rng), None
    mode, difficulty = "think_off", "easy"
  return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": question},
                       {"role": "assistant", "content": assistant_content(mode, answer, think)}],
          "mode": mode, "domain": domain, "difficulty": difficulty}


def generate_records(num: int, seed: int, think_on_fraction: float = 0.35
                     ) -> list[dict[str, Any]]:
  if num < 0 or not 0 <= think_on_fraction <= 1:
    raise ValueError(f"need num >= 0 and think_on_fraction in [0, 1], got {num}, "
                     f"{think_on_fraction}")
  rng = random.Random(seed)
  return [make_record(rng, think_on_fraction) for _ in range(num)]


def trigger_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  tags = kat_tag_ids(tokenizer)
  return tags["<think_on>"], tags["<think_off>"]


def dual_regime_document(record: dict[str, Any], tokenizer: Tokenizer, *,
                         add_eos: bool = True) -> Document:
  """KAT-template tokens of a chat record; assistant tokens trained except the mode trigger.

  Works for any chat record (the trigger mask is a no-op without triggers); plain text
  records fall back to `pipeline.record_to_document`.
  """
  if "messages" not in record:
    from kat_jax.data.pipeline import record_to_document  # pylint: disable=g-import-not-at-top
    return record_to_document(record, tokenizer, add_eos=add_eos)
  chat = chat_template.tokenize_chat(tokenizer, record["messages"], template="kat",
                                     keep_last_reasoning=True)
  tokens = np.asarray(chat.ids, np.int32)
  mask = chat.loss_mask(("assistant",)).astype(np.float32)
  mask[np.isin(tokens, trigger_ids(tokenizer))] = 0.0  # input, not target (report §3.1)
  if add_eos:
    tokens = np.append(tokens, np.int32(tokenizer.eos_id))
    mask = np.append(mask, np.float32(1.0))
  return Document(tokens, mask)


class DualRegimeToDocument:
  """Picklable record -> Document callable for grain."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, record: dict[str, Any]) -> Document:
    return dual_regime_document(record, self.tokenizer)
