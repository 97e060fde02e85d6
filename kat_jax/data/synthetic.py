"""A small seeded procedural corpus a tiny byte-level model learns visibly in a few hundred steps.

Each document (about 30-200 ASCII bytes) is one of a few task kinds with learnable structure:
arithmetic facts ("17 + 25 = 42."), counting runs, key-value lookups, repeated patterns and
string reversal. The same (num_docs, seed) always gives the same corpus (Python's
`random.Random`, whose sequence is stable across versions). The full AutoThink task generator
is a later, separate piece.
"""

from __future__ import annotations

import os
import random
import string
from typing import Callable

from kat_jax.data import sources

MIN_DOC_BYTES = 30
MAX_DOC_BYTES = 200


def _arithmetic_fact(rng: random.Random) -> str:
  op = rng.choice("+-*")
  if op == "*":
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a} * {b} = {a * b}."
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  if op == "-":
    a, b = max(a, b), min(a, b)  # non-negative results keep the task simple
    return f"{a} - {b} = {a - b}."
  return f"{a} + {b} = {a + b}."


def _counting(rng: random.Random) -> str:
  start, step = rng.randint(0, 90), rng.choice([1, 1, 2, 3, 5])
  count = rng.randint(5, 12)
  return f"count by {step} from {start}: " + " ".join(
      str(start + i * step) for i in range(count)) + "."


def _key_value(rng: random.Random) -> str:
  keys = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
  values = {k: rng.randint(0, 9) for k in keys}
  query = rng.choice(keys)
  table = " ".join(f"{k}={v}" for k, v in values.items())
  return f"{table}. {query}? {values[query]}."


def _pattern(rng: random.Random) -> str:
  unit = "".join(rng.choice("abcdxyz") for _ in range(rng.randint(2, 4)))
  return "pattern: " + " ".join([unit] * rng.randint(4, 8)) + "."


def _reverse(rng: random.Random) -> str:
  word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
  return f"reverse {word} -> {word[::-1]}."


_TASKS: tuple[Callable[[random.Random], str], ...] = (
    _arithmetic_fact, _counting, _key_value, _pattern, _reverse)


def _document(rng: random.Random) -> str:
  """Sentences of one task kind, added until the document is long enough (bounded above)."""
  task = rng.choice(_TASKS)
  target = rng.randint(MIN_DOC_BYTES, MAX_DOC_BYTES)
  text = task(rng)
  while len(text) < target:
    sentence = task(rng)
    if len(text) + 1 + len(sentence) > MAX_DOC_BYTES:
      if len(text) >= MIN_DOC_BYTES:
        break
      continue  # draw a shorter sentence; every task has some under the slack
    text += " " + sentence
  return text


def generate_corpus(num_docs: int, seed: int) -> list[dict[str, str]]:
  """Returns `num_docs` records `{"text": ...}`, deterministic in (num_docs, seed)."""
  if num_docs < 0:
    raise ValueError(f"num_docs must be >= 0, got {num_docs}")
  rng = random.Random(seed)
  return [{"text": _document(rng)} for _ in range(num_docs)]


def write_corpus_jsonl(path: str | os.PathLike, num_docs: int, seed: int) -> str:
  """Writes `generate_corpus(num_docs, seed)` as JSON lines; returns the path."""
  sources.write_jsonl(generate_corpus(num_docs, seed), path)
  return os.fspath(path)
