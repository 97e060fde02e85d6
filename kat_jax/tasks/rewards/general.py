"""General reward: a binary heuristic for open-ended answers.

KAT-V1 report §4.2.2 scores general queries with "lightweight heuristics (keyword overlap,
simple classifier)". This is such a heuristic, not a judge of quality: the answer must be
non-empty, within length bounds, free of repetition loops, and, when the task gives a reference
or keywords, cover enough of them.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from kat_jax.tasks.rewards.math import answer_region

_WORD = re.compile(r"\w+", re.UNICODE)
_STOPWORDS = frozenset(
    "a an the of to in on at for and or but is are was were be been it this that with as by "
    "from so if then than not no yes do does did can could will would should".split())


def has_repetition_loop(text: str, *, ngram: int = 8, max_repeats: int = 4,
                        max_compression: float = 0.12) -> bool:
  """True if a word n-gram occurs more than `max_repeats` times, or the text compresses to
  less than `max_compression` of its size (degenerate loops compress extremely well)."""
  words = _WORD.findall(text.lower())
  counts: dict[tuple[str, ...], int] = {}
  for i in range(len(words) - ngram + 1):
    key = tuple(words[i:i + ngram])
    counts[key] = counts.get(key, 0) + 1
    if counts[key] > max_repeats:
      return True
  raw = text.encode("utf-8")
  return len(raw) >= 400 and len(zlib.compress(raw)) < max_compression * len(raw)


def keyword_coverage(text: str, keywords: Sequence[str]) -> float:
  """Fraction of keywords (case-insensitive, whole words) found in the text."""
  if not keywords:
    return 1.0
  words = set(_WORD.findall(text.lower()))
  found = sum(all(w in words for w in _WORD.findall(k.lower())) for k in keywords)
  return found / len(keywords)


def content_words(text: str) -> list[str]:
  return sorted({w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS})


def general_problems(response: str, *, reference: str | None = None,
                     keywords: Sequence[str] | None = None, min_chars: int = 1,
                     max_chars: int = 8000, min_coverage: float = 0.5) -> list[str]:
  """Reasons the heuristic rejects the response's answer ([] when accepted)."""
  if min_chars < 0 or max_chars < min_chars:
    raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
  answer = answer_region(response).strip()
  problems = []
  if len(answer) < max(min_chars, 1):
    problems.append("answer empty or too short")
  if len(answer) > max_chars:
    problems.append(f"answer longer than {max_chars} characters")
  if has_repetition_loop(answer):
    problems.append("repetition loop")
  wanted = list(keywords or []) + (content_words(reference) if reference else [])
  if wanted and keyword_coverage(answer, wanted) < min_coverage:
    problems.append("too little overlap with the reference/keywords")
  return problems


def general_reward(response: str, **kwargs) -> float:
  """1.0 if `general_problems(response, **kwargs)` is empty, else 0.0 (heuristic)."""
  return 0.0 if general_problems(response, **kwargs) else 1.0
