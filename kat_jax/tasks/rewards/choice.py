"""Multiple-choice reward (docs/spec.md §6.3).

KAT-V1 report §4.2.2: take the first letter of the submitted option and compare it with
the key. Inside the `<answer>` block we look, in order, for: an answer that starts with an
option letter ("B", "(B) 30", "**B.**"), openai/simple-evals' `Answer: X` line, "answer is
(X)", and `\\boxed{X}`.
"""

from __future__ import annotations

import re

from kat_jax.tasks.rewards.math import answer_region, last_boxed

DEFAULT_LETTERS = "ABCDEFGHIJ"


def _patterns(letters: str) -> list[re.Pattern]:
  cls = f"[{re.escape(letters)}]"
  return [
      re.compile(rf"^[\s*_(\[]*({cls})(?:[\s*_)\].:,]|$)"),  # leading option letter
      re.compile(rf"^[\s*_(\[]*({cls.lower()})[)\].:]"),  # "b) 12" but not "a force"
      re.compile(rf"(?i)Answer[ \t]*:[ \t]*[*_]*\$?\(?({cls})\)?\$?(?![A-Za-z])"),
      re.compile(rf"(?i)answer is[ \t:]*[*_]*\(?({cls})\)?(?![A-Za-z])"),
  ]


def extract_choice(response: str, letters: str = DEFAULT_LETTERS) -> str | None:
  """Option letter chosen by the response (upper case), or None."""
  if not isinstance(response, str):
    raise ValueError(f"response must be str, got {type(response).__name__}")
  if not letters or not letters.isalpha():
    raise ValueError(f"letters must be a non-empty string of letters, got {letters!r}")
  letters = letters.upper()
  text = answer_region(response).strip()
  for pattern in _patterns(letters):
    m = pattern.search(text)
    if m:
      return m.group(1).upper()
  boxed = last_boxed(text)
  if boxed is not None:
    m = re.fullmatch(rf"\s*(?:\\text\{{)?\(?([{letters}])\)?\}}?\s*", boxed)
    if m:
      return m.group(1)
  return None


def choice_reward(response: str, key: str, letters: str = DEFAULT_LETTERS) -> float:
  """1.0 if the chosen option letter equals `key` (case-insensitive), else 0.0."""
  if not isinstance(key, str) or len(key.strip()) != 1:
    raise ValueError(f"key must be a single option letter, got {key!r}")
  return 1.0 if extract_choice(response, letters) == key.strip().upper() else 0.0
