"""Math reward: extract the final answer, normalise it, decide equivalence with SymPy.

KAT-V1 report (arXiv 2507.08297) §4.2.2: math answers are scored by symbolic equivalence
(algebraic simplification and numeric approximation), 1 if correct else 0. The answer is the last
\\boxed{}, else an "answer is X" phrase, else the value the last sentence states ("So x = -3.").
Normalisation handles the forms HF Math-Verify's tests cover (docs/spec.md §6.1) and more: \\frac
variants, mixed numbers (2\\frac{1}{3}), units (dropped against a bare value, converted between
each other, never confused with words that change a value such as "squared"), percentages,
intervals and inequalities, sets (order and repeats ignored), tuples, equations up to scaling.
The code is our own; docs/rewards.md ("Math answers") lists the rules and their measured
agreement with math-verify 0.9 on a hand-written table.

Equivalence order (cheap first): normalised string equality, then structure (interval / tuple /
set / list / equation), then SymPy: decimals are read as exact rationals; the difference
simplifies to 0, or exact numbers agree numerically, or a decimal is the exact value correctly
rounded to at least 7 significant digits.

SymPy can hang or blow up (`9^9^9^9`), so `math_equal` runs the SymPy step in a worker
process with a time limit per comparison and a budget per answer (`MathChecker`); the worker
is killed and replaced on timeout. Workers are reward infrastructure (`health.py`): one
that cannot start, or keeps dying, raises `RewardInfrastructureError` instead of grading
answers 0, and their start-up never counts against an answer's time. SymPy's `parse_expr`
evaluates Python, so every expression is first reduced to a whitelist of characters and
names (digits, operators, single-letter symbols, a few functions).
"""

from __future__ import annotations

import atexit
import cmath
import multiprocessing
import re
import threading
import time
import weakref
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, NamedTuple

from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.errors import RewardInfrastructureError
from kat_jax.tasks.rewards.health import InfrastructureHealth, infrastructure_time

_MIN_DECIMAL_DIGITS = 7  # a decimal stands for an exact value only when this precise
_MAX_ANSWER_CHARS = 1000  # longer answers are not compared (bounded work per answer)


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(
    r"(?:final answer|answer)\s*\**\s*(?:is|:)\s*\**\s*:?\s*(.+?)(?:\.\s|\.?$|\n|I hope)",
    re.IGNORECASE)
_CAUSE = re.compile(r",?\s+(?:since|because|as|which|given)\b", re.IGNORECASE)
_MATH_SEGMENT = re.compile(r"(?<!\\)\$\$?(.+?)(?<!\\)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_NEGATION = re.compile(r"\b(?:not|never|no|nor)\b|n't\b", re.IGNORECASE)
_NEGATED_AFTER = re.compile(
    r"\s*(?:(?:is|was|are)\s+(?:not|never|wrong|incorrect)\b|(?:isn't|wasn't|aren't)\b)",
    re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[;,:]|\bbut\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CONNECTOR = re.compile(r"\s+(?:or|and)\s+")
# Words a math run may contain besides single letters (variables) and `or`/`and` between values.
_MATH_WORDS = {"sqrt", "pi", "sin", "cos", "tan", "log", "ln", "exp", "percent"}
_TOKEN = re.compile(r"""(?P<space>\s+)
  |(?P<num>\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?|\.\d+)
  |(?P<cmd>\\[A-Za-z]+|\\[{}$%,;!])
  |(?P<word>[A-Za-z]+)
  |(?P<sym>[-+*/^=<>()\[\]{}_!|%$,'π√°−×·∞≤≥±])
  |(?P<other>.)""", re.X | re.S)


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` that closes the `{` at open_index (None if unbalanced)."""
  depth = 0
  for i in range(open_index, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return i
  return None


def _closing_braces(text: str) -> dict[int, int]:
  """{index of each `{`: index of its `}`} for balanced pairs, in one pass (linear even for
  an adversarial run of unclosed `\\boxed{`)."""
  pairs, stack = {}, []
  for i, ch in enumerate(text):
    if ch == "{":
      stack.append(i)
    elif ch == "}" and stack:
      pairs[stack.pop()] = i
  return pairs


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (nested braces kept), or of `\\boxed 5`."""
  found, pairs = None, None
  for m in _BOXED.finditer(text):
    start = m.end()
    if start < len(text) and text[start] == "{":
      pairs = _closing_braces(text) if pairs is None else pairs
      if start in pairs:
        found = text[start + 1:pairs[start]]
    else:
      word = re.match(r"[^\s$.,]+", text[start:])
      if word:
        found = word.group(0)
  return found


def answer_region(response: str) -> str:
  """The part of a response that holds the final answer: inside `<answer>` when present."""
  if "<answer>" in response:
    answer = parse_autothink_response(response)["answer"]
    if answer is not None:
      return answer
  return response


def _math_runs(text: str) -> list[tuple[int, int, bool]]:
  """Spans of math in prose: (start, end, holds_a_value) of each maximal run of numbers,
  LaTeX commands, operators and single-letter variables; `or`/`and` between two math tokens
  stay inside a run ("x = 2 or x = -3"), any other word ends it."""
  runs, start, end, has_value = [], None, 0, False
  for m in _TOKEN.finditer(text):
    kind, token = m.lastgroup, m.group()
    if kind == "space" or (kind == "word" and start is not None and token in ("or", "and")):
      continue  # a connector joins the run only if math follows it (`end` is not moved)
    if kind in ("num", "cmd", "sym") or (
        kind == "word" and (len(token) == 1 or token.lower() in _MATH_WORDS)):
      if start is None:
        start, has_value = m.start(), False
      end = m.end()
      has_value = has_value or kind in ("num", "cmd") or token in "π√∞"
    elif start is not None:
      runs.append((start, end, has_value))
      start = None
  if start is not None:
    runs.append((start, end, has_value))
  return runs


def _final_side(item: str) -> str:
  """`3 + 6 = 9` -> `9`; `x = 2 + 3 = 5` -> `x = 5`; `x = 5` stays (the variable is kept)."""
  parts = item.split("=")
  if len(parts) < 2 or any(p.endswith(("<", ">", "!")) for p in parts[:-1]):
    return item
  left = parts[0].strip()
  if re.fullmatch(r"[A-Za-z](?:_\{?\w+\}?)?(?:\([^()=]*\))?", left):
    return f"{left} = {parts[-1].strip()}"
  return parts[-1].strip() if not re.search(r"[A-Za-z]", left) else item


def _as_answer(statement: str) -> str:
  """"x = 2 or x = -3" -> "x = 2, x = -3"; "3 + 6 = 9" -> "9" (see `_final_side`)."""
  statement = _TEXT_CONNECTOR.sub(r" \1 ", statement)
  items = _CONNECTOR.split(statement.strip().strip(",;:").strip())
  return ", ".join(_final_side(item) for item in items)


def _value_spans(text: str) -> list[tuple[int, int, str]]:
  """(start, end, value) of each value a phrase states, in order: its `$..$`/`\\(..\\)` math
  holding a value (pieces joined by `,`/`and`/`or` form one value: "$1$ and $2$" -> "1, 2");
  without such math, its math runs holding a value (a following word that changes the
  value stays with it: "5 squared", "5 thousand")."""
  spans = []
  for m in _MATH_SEGMENT.finditer(text):
    content = next(g for g in m.groups() if g is not None).strip()
    if not re.search(r"[\d\\π√∞]", content):
      continue  # "$x$ is $7$": the variable's name is not a value
    gap = text[spans[-1][1]:m.start()] if spans else ""
    if spans and gap.strip() and re.fullmatch(r"\s*,?\s*(?:or|and)?\s*", gap):
      start, _, value = spans.pop()
      spans.append((start, m.end(), f"{value}, {_as_answer(content)}"))
    else:
      spans.append((m.start(), m.end(), _as_answer(content)))
  if spans:
    return spans
  for start, end, has_value in _math_runs(text):
    if not has_value:
      continue
    after = re.match(r"\s*([A-Za-z]+)", text[end:])
    if after and after.group(1).lower() in _VALUE_CHANGERS:
      end += after.end()
    spans.append((start, end, _as_answer(text[start:end])))
  return spans


def _stated_value(text: str) -> str | None | bool:
  """The value a phrase or sentence states: the last of `_value_spans` that is not negated
  ("not 5", "5 is not the answer"); False when every one is negated; None when none."""
  spans = _value_spans(text)
  for k in reversed(range(len(spans))):
    start, end, value = spans[k]
    before = _CLAUSE_BREAK.split(text[spans[k - 1][1] if k else 0:start])[-1]
    if _NEGATION.search(before) or _NEGATED_AFTER.match(text[end:]):
      continue  # negated in its own clause: "it isn't 4, it is 6" keeps 6
    return value
  return False if spans else None


def _sentence_answer(text: str) -> str | None:
  """The value stated by the last sentence that states one (None if negated or none)."""
  for sentence in reversed(_SENTENCE_END.split(text.strip())):
    value = _stated_value(sentence)
    if value is False:
      return None
    if value:
      return value
  return None


def _has_prose(text: str) -> bool:
  """Words (2+ letters, not LaTeX commands, not inside \\text{}) outside math names."""
  bare = re.sub(r"\\[A-Za-z]+(?:\s*\{[^{}]*\})?", " ", text)
  return any(w.lower() not in _MATH_WORDS for w in re.findall(r"[A-Za-z]{2,}", bare))


def extract_math_answer(response: str) -> str | None:
  """Final answer string of a response: the last \\boxed{}, else the "answer is X" phrase,
  else a short bare answer, else the value the last sentence stating one states ("So
  x = -3."). None when there is none, or when every value stated is negated ("The answer is
  not 5.").

  Only the `<answer>` block is searched when the response has one.
  """
  if not isinstance(response, str):
    raise ValueError(f"response must be str, got {type(response).__name__}")
  text = answer_region(response)
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  matches = list(_ANSWER_IS.finditer(text))
  if matches:
    phrase = _CAUSE.split(matches[-1].group(1).replace("**", ""))[0].strip()
    value = _stated_value(phrase)
    if value is False:
      return None
    return value or phrase.strip("$").strip() or None
  stripped = text.strip()
  if stripped and len(stripped) <= 40 and "\n" not in stripped and (
      not _has_prose(stripped) or not re.search(r"[\d$]", stripped)):
    return stripped  # a bare short answer such as "x = 5", "\frac{1}{2}" or "Evelyn"
  return _sentence_answer(text)


# ---------------------------------------------------------------------------
# Normalisation (string level)
# ---------------------------------------------------------------------------

_DELETE = (r"\displaystyle", r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "\\$",
           r"\(", r"\)", r"\[", r"\]", "$", r"\limits", r"\mathrm", r"\mathbf", r"\bigl",
           r"\bigr", r"\Bigl", r"\Bigr", r"\big", r"\Big", r"\quad", r"\qquad")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{")
_PERCENT = re.compile(r"(\\%|%|\s*percent\b|\s*pct\b)")
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree|\\circ")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])")
_OVER = re.compile(r"\{([^{}]*)\\over([^{}]*)\}")
_COLUMN_VECTOR = re.compile(r"\\begin\{[pb]matrix\}(.*?)\\end\{[pb]matrix\}", re.S)
_EMPTY_SET = re.compile(r"^(?:\\emptyset|\\varnothing|∅|\\\{\s*\\\})$")
_REALS = re.compile(r"^(?:\\mathbb\s*\{?R\}?|ℝ)$")
_TEXT_CONNECTOR = re.compile(r"\\text\s*\{\s*(or|and)\s*\}")
# A unit written without \text after a value: "10 cm", "3 hours", "60 km/h", "20 cm^2".
_PLAIN_UNIT = re.compile(
    r"^(?P<value>.*?[\d}).])\s*(?P<unit>(?:(?:square|sq|cubic)\s+)?[A-Za-z]+(?:/[A-Za-z]+)?)"
    r"(?P<power>\^\s*\{?[23]\}?|²|³)?$")

# Units that convert into each other: name -> (dimension, factor to the dimension's base).
_UNIT_FACTORS = {
    "mm": ("length", Fraction(1, 1000)), "cm": ("length", Fraction(1, 100)),
    "m": ("length", Fraction(1)), "km": ("length", Fraction(1000)),
    "in": ("length", Fraction(127, 5000)), "ft": ("length", Fraction(381, 1250)),
    "yd": ("length", Fraction(1143, 1250)), "mi": ("length", Fraction(201168, 125)),
    "mg": ("mass", Fraction(1, 1000)), "g": ("mass", Fraction(1)), "kg": ("mass", Fraction(1000)),
    "s": ("time", Fraction(1)), "min": ("time", Fraction(60)), "h": ("time", Fraction(3600)),
    "day": ("time", Fraction(86400)), "week": ("time", Fraction(604800)),
    "ml": ("volume", Fraction(1, 1000)), "l": ("volume", Fraction(1)),
    "$": ("money", Fraction(1)), "cent": ("money", Fraction(1, 100)),
}
_UNIT_ALIASES = {
    "millimeter": "mm", "millimetre": "mm", "centimeter": "cm", "centimetre": "cm",
    "meter": "m", "metre": "m", "kilometer": "km", "kilometre": "km", "inch": "in",
    "inches": "in", "foot": "ft", "feet": "ft", "yard": "yd", "mile": "mi", "milligram": "mg",
    "gram": "g", "kilogram": "kg", "kgs": "kg", "second": "s", "sec": "s", "minute": "min",
    "mins": "min", "hour": "h", "hr": "h", "hrs": "h", "day": "day", "week": "week",
    "milliliter": "ml", "millilitre": "ml", "liter": "l", "litre": "l", "degree": "deg",
    "dollar": "$", "usd": "$", "cent": "cent", "unit": "unit", "mile per hour": "mph",
    "miles per hour": "mph", "kilometer per hour": "km/h", "kilometers per hour": "km/h",
    "kmh": "km/h", "kph": "km/h", "meter per second": "m/s", "meters per second": "m/s",
}
# Number words after a value scale it; they are not units.
_MULTIPLIERS = {"dozen": 12, "hundred": 100, "thousand": 1000, "million": 10**6,
                "billion": 10**9, "trillion": 10**12}
# Words after a value that change it or hedge it: never read as a unit ("5 squared" is 25,
# "5 (or 6)" is a hedge); an answer holding one is left as text and matches nothing.
_NOT_UNITS = {"squared", "cubed", "factorial", "times", "over", "plus", "minus", "divided",
              "root", "roots", "power", "powers", "inverse", "half", "halves", "third",
              "thirds", "quarter", "quarters", "fourth", "fourths", "fifth", "fifths",
              "sixth", "sixths", "eighth", "eighths", "tenth", "tenths", "hundredth",
              "hundredths", "thousandth", "thousandths", "of", "less", "more", "than",
              "or", "and", "not", "to", "mod", "modulo", "if", "for", "when", "where",
              "unless", "except", "approximately", "about", "roughly", "least", "most",
              "between", "from"}
# Words that change the value they follow in prose ("5 squared", "5 thousand", "5 more").
_VALUE_CHANGERS = {"squared", "cubed", "factorial", "times", "over", "plus", "minus",
                   "divided", "halves", "thirds", "quarters", "fourths", "fifths", "sixths",
                   "eighths", "tenths", "hundredths", "thousandths", "more", "less", "to",
                   *_MULTIPLIERS}
# Known unit names that may follow a value without \text (longer free words also count as
# units: "5 apples"); single letters are variables unless inside \text{}.
_PLAIN_UNIT_NAMES = set(_UNIT_FACTORS) - {"m", "g", "s", "h", "l"} | {"mph", "kph", "deg"}


class _Unit(NamedTuple):
  name: str  # canonical: "cm", "deg", "apple", "km/h"
  power: int  # 2 for cm^2 / square units


def _unit_like(text: str) -> bool:
  """Could `text` (from \\text{} after a value) be a unit: words only, none of _NOT_UNITS."""
  words = re.findall(r"[A-Za-z]+", text.lower())
  return bool(words) and not re.search(r"[\d=()\[\],;]", text) and not any(
      w in _NOT_UNITS for w in words)


def _canonical_unit(text: str, power: int = 1) -> _Unit | None:
  words = text.lower().replace(".", "").split()
  if words and words[0] in ("square", "sq", "cubic"):
    power, words = (3 if words[0] == "cubic" else 2), words[1:]
  if not words:
    return None
  name = " ".join(words)
  for candidate in (name, name[:-1] if name.endswith("s") and len(name) > 2 else name):
    if candidate in _UNIT_ALIASES or candidate in _UNIT_FACTORS:
      return _Unit(_UNIT_ALIASES.get(candidate, candidate), power)
  return _Unit(name[:-1] if name.endswith("s") and len(name) > 3 else name, power)


def _unit_power(text: str | None) -> int:
  """"^2", "^{3}", "²" -> 2, 3, 2; None -> 1."""
  m = re.search(r"[23²³]", text or "")
  return 1 if not m else 2 if m.group() in "2²" else 3


def _split_plain_unit(s: str) -> tuple[str, _Unit | None]:
  """"10 cm" -> ("10", cm); "2x" and "5 m" stay (a single letter may be a variable)."""
  m = _PLAIN_UNIT.match(s)
  if not m:
    return s, None
  unit = m.group("unit")
  base = unit.split()[-1].split("/")[0].lower()
  known = base in _PLAIN_UNIT_NAMES or base.rstrip("s") in _UNIT_ALIASES or "/" in unit
  if base in _NOT_UNITS or unit.split()[0].lower() in _NOT_UNITS:
    return s, None
  if not known and (len(base) < 3 or base in _MATH_WORDS or base in _FUNCS):
    return s, None
  if re.search(r"[A-Za-z]\s*$", m.group("value")) or m.group("value").endswith("\\"):
    return s, None
  return m.group("value").strip(), _canonical_unit(unit, _unit_power(m.group("power")))


def _interval_from_inequality(s: str) -> str:
  """`x \\le 3` -> `(-\\infty, 3]`; `-1 \\le x < 4` -> `[-1, 4)`; other text unchanged."""
  t = re.sub(r"\\leq?(?![a-z])|≤|<=", " LE ", s)
  t = re.sub(r"\\geq?(?![a-z])|≥|>=", " GE ", t)
  t = t.replace("<", " LT ").replace(">", " GT ")
  ops = re.findall(r"\b(LE|GE|LT|GT)\b", t)
  parts = [p.strip() for p in re.split(r"\b(?:LE|GE|LT|GT)\b", t)]
  var = r"[A-Za-z]"
  if len(ops) == 1 and re.fullmatch(var, parts[0]) and parts[1]:
    bound, op = parts[1], ops[0]
  elif len(ops) == 1 and re.fullmatch(var, parts[1]) and parts[0]:
    bound, op = parts[0], {"LE": "GE", "GE": "LE", "LT": "GT", "GT": "LT"}[ops[0]]
  elif len(ops) == 2 and re.fullmatch(var, parts[1]) and parts[0] and parts[2] and \
      ops[0] in ("LE", "LT") and ops[1] in ("LE", "LT"):
    return (f"{'[' if ops[0] == 'LE' else '('}{parts[0]}, "
            f"{parts[2]}{']' if ops[1] == 'LE' else ')'}")
  else:
    return s
  if re.search(r"\b(?:LE|GE|LT|GT)\b", bound):
    return s
  return {"LE": f"(-\\infty, {bound}]", "LT": f"(-\\infty, {bound})",
          "GE": f"[{bound}, \\infty)", "GT": f"({bound}, \\infty)"}[op]


def _column_vector(m: re.Match) -> str:
  body = m.group(1)
  if "&" in body:
    return m.group(0)  # a matrix with columns: left as it is (compared as text)
  return "(" + ", ".join(r.strip() for r in body.split("\\\\") if r.strip()) + ")"


class _Normalized(NamedTuple):
  text: str
  percent: bool
  unit: _Unit | None


def _normalize(answer: str) -> _Normalized:
  s = answer.strip()
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
  s = _OVER.sub(r"\\frac{\1}{\2}", s)
  s = _COLUMN_VECTOR.sub(_column_vector, s)
  s = s.replace("{,}", ",").replace("\\{", "\x01").replace("\\}", "\x02")
  s = _TEXT_CONNECTOR.sub(r" \1 ", s)
  s, texts = _unwrap_text_commands(s)
  unit = None
  outside = s.replace("\x00", "").strip()
  if outside and re.search(r"[\w\\]", outside):
    power = re.search(r"\x00\s*\^\s*\{?([23])\}?\s*$", s)
    s = re.sub(r"\x00\s*\^\s*\{?[23]\}?\s*$", "", s) if power else s  # "cm}^2": a unit power
    unit_text = " ".join(t.strip() for t in texts if t.strip())
    if _unit_like(unit_text):
      s = s.replace("\x00", "")  # value + \text{units}: drop the units
      unit = _canonical_unit(unit_text, int(power.group(1)) if power else 1)
    else:  # "5 \text{ squared}", "5 \text{ (or 6)}": not a unit; keep the words
      pieces = iter(texts)
      s = re.sub("\x00", lambda _: f" {next(pieces)} ", s)
  else:
    s = " ".join(t.strip() for t in texts) if texts else outside
  currency = "\\$" in s  # \$12: dollars (a bare $ is a math delimiter)
  for token in _DELETE:
    s = s.replace(token, "")
  s = s.replace("\\langle", "(").replace("\\rangle", ")")
  if _DEGREE.search(s):
    s = _DEGREE.sub("", s)
    unit = unit or _Unit("deg", 1)
  had_percent = bool(_PERCENT.search(s))
  s = _PERCENT.sub("", s)
  s = s.replace("\x01", "\\{").replace("\x02", "\\}")
  s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
  s = " ".join(s.split()).strip().rstrip(".").strip()
  if unit is None:
    s, unit = _split_plain_unit(s)
  if unit is None and currency:
    unit = _Unit("$", 1)
  if unit is not None and unit.name in _MULTIPLIERS:  # "5 thousand" is 5000, not 5
    s, unit = f"({s})*{_MULTIPLIERS[unit.name]}", None
  if unit is not None and unit.name in ("percent", "pct"):  # "5 \text{ percent}"
    had_percent, unit = True, None
  s = _CONNECTOR.sub(", ", s)
  if _EMPTY_SET.match(s):
    s = "\\emptyset"
  if _REALS.match(s):
    s = "(-\\infty, \\infty)"
  return _Normalized(_interval_from_inequality(s), had_percent, unit)


def _unwrap_text_commands(s: str) -> tuple[str, list[str]]:
  """Replace \\text{..} etc. by a placeholder `\\x00`; returns (rest, list of texts)."""
  texts = []
  while True:
    m = _TEXT_CMD.search(s)
    if not m:
      return s, texts
    end = _matching_brace(s, m.end() - 1)
    if end is None:
      return s[:m.start()] + s[m.end():], texts
    texts.append(s[m.end():end])
    s = s[:m.start()] + "\x00" + s[end + 1:]


# ---------------------------------------------------------------------------
# LaTeX-lite -> SymPy source (whitelisted)
# ---------------------------------------------------------------------------

_FUNCS = {"sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "log",
          "ln", "exp", "pi", "oo", "abs", "factorial"}
_LATEX_WORDS = {r"\pi": " pi ", r"\infty": " oo ", r"\cdot": "*", r"\times": "*",
                r"\div": "/", r"\ln": " log ", r"\log": " log ", r"\exp": " exp ",
                r"\sin": " sin ", r"\cos": " cos ", r"\tan": " tan ", r"\cot": " cot ",
                r"\sec": " sec ", r"\csc": " csc ", r"\arcsin": " asin ",
                r"\arccos": " acos ", r"\arctan": " atan ", "−": "-", "π": " pi ",
                "∞": " oo ", "×": "*", "·": "*", "√": r"\sqrt"}
_SAFE_CHARS = re.compile(r"^[0-9a-zA-Z+\-*/^().,!\s]*$")
# A mixed number: 2\frac{1}{3} (or 2\frac13) is 2 + 1/3, not 2 * 1/3; so is "4 1/2".
_MIXED_LATEX = re.compile(
    r"(?<![\w.^}\\)])(\d+)\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_MIXED_PLAIN = re.compile(r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$")


def _mixed_numbers(s: str) -> str:
  def latex(m: re.Match) -> str:
    whole, num, den = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5)
    if int(num) >= int(den):
      return m.group(0)  # 2\frac{5}{3} is not written as a mixed number: a product
    return f"({whole}+\\frac{{{num}}}{{{den}}})"
  s = _MIXED_LATEX.sub(latex, s)
  m = _MIXED_PLAIN.match(s.strip())
  if m and int(m.group(3)) < int(m.group(4)):
    s = f"{m.group(1)}({m.group(2)}+{m.group(3)}/{m.group(4)})"
  return s


def _braced_arg(s: str, i: int) -> tuple[str, int]:
  """Argument of a LaTeX command at index i: `{...}` or a single character (`\\frac13`)."""
  while i < len(s) and s[i] == " ":
    i += 1
  if i >= len(s):
    raise ValueError("missing argument")
  if s[i] == "{":
    end = _matching_brace(s, i)
    if end is None:
      raise ValueError("unbalanced braces")
    return s[i + 1:end], end + 1
  return s[i], i + 1


def _convert_commands(s: str) -> str:
  r"""\frac{a}{b} -> ((a)/(b)), \sqrt[n]{a} -> ((a)**(1/(n))), \sqrt{a} -> sqrt(a)."""
  out, i = [], 0
  while i < len(s):
    if s.startswith("\\frac", i):
      num, i = _braced_arg(s, i + 5)
      den, i = _braced_arg(s, i)
      out.append(f"(({_convert_commands(num)})/({_convert_commands(den)}))")
    elif s.startswith("\\sqrt", i):
      i += 5
      if i < len(s) and s[i] == "[":
        close = s.index("]", i)
        root = s[i + 1:close]
        arg, i = _braced_arg(s, close + 1)
        out.append(f"(({_convert_commands(arg)})**(1/({_convert_commands(root)})))")
      else:
        arg, i = _braced_arg(s, i)
        out.append(f"sqrt({_convert_commands(arg)})")
    else:
      out.append(s[i])
      i += 1
  return "".join(out)


def to_sympy_source(s: str, *, split_letters: bool = False) -> str | None:
  """Whitelisted SymPy source for a normalised scalar expression, or None if not parseable.

  split_letters: read an unknown word as a product of single-letter symbols (`ab` = a*b);
  the caller allows it only for answers that are visibly algebra, so that words stay words.
  """
  s = _mixed_numbers(s)
  for word, repl in sorted(_LATEX_WORDS.items(), key=lambda kv: -len(kv[0])):
    s = s.replace(word, repl)
  try:
    s = _convert_commands(s)
  except (ValueError, IndexError):
    return None
  s = s.replace("{", "(").replace("}", ")").replace("^", "**")
  if "\\" in s or not _SAFE_CHARS.match(s) or len(s) > 400 or "," in s:
    return None
  if re.search(r"\d\s+\.?\d", s):
    return None  # "2 3": two numbers side by side are not a product anyone writes
  out = []
  for piece in re.split(r"([A-Za-z]+)", s):
    if len(piece) > 1 and piece.isalpha() and piece not in _FUNCS:
      if not split_letters:
        return None  # unknown words: not an expression (compare as text instead)
      piece = "*".join(piece)
    out.append(piece)
  return "".join(out)


# ---------------------------------------------------------------------------
# Structure: intervals, tuples, sets, lists, equations
# ---------------------------------------------------------------------------


def _split_top_level(s: str, sep: str = ",") -> list[str]:
  parts, depth, cur = [], 0, []
  for ch in s:
    if ch in "([{\x01":
      depth += 1
    elif ch in ")]}\x02":
      depth -= 1
    if ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  parts.append("".join(cur))
  return [p.strip() for p in parts]


def _enclosing_pair(s: str) -> tuple[str, str, str] | None:
  """(open, close, inner) when the whole of s is one bracketed group."""
  s = s.strip()
  if s.startswith("\\{") and s.endswith("\\}"):
    return "{", "}", s[2:-2]
  if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
    return None
  depth = 0
  for i, ch in enumerate(s):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if depth == 0 and i < len(s) - 1:
      return None  # e.g. "(1)+(2)"
  return s[0], s[-1], s[1:-1]


def _strip_variable_prefix(s: str) -> str:
  """"x = 3" -> "3", "x \\in [1, 2]" -> "[1, 2]" (a single variable on the left only)."""
  m = re.match(r"^\s*[A-Za-z](?:_\{?\w+\}?)?(?:\([^()=]*\))?\s*(?:=|\\in)\s*(.+)$", s)
  return m.group(1) if m else s


def _expand_plus_minus(items: list[str]) -> list[str]:
  """`\\pm 3` -> `3`, `-3`; `1 \\pm \\sqrt{2}` -> `1+(\\sqrt{2})`, `1-(\\sqrt{2})`."""
  out = []
  for item in items:
    item = _strip_variable_prefix(item)
    parts = re.split(r"\\pm|\\mp|±", item)
    if len(parts) != 2:
      out.append(item)
      continue
    left, right = parts[0].strip(), parts[1].strip()
    out += [f"{left}+({right})", f"{left}-({right})"] if left else [right, f"-({right})"]
  return out


def _assignments_as_tuple(s: str) -> str:
  """"x = 3, y = -1" -> "(3, -1)" (values ordered by variable name); other text unchanged."""
  items = _split_top_level(s)
  if len(items) < 2:
    return s
  pairs = [re.fullmatch(r"([A-Za-z])\s*=\s*([^=]+)", item) for item in items]
  if not all(pairs) or len({p.group(1) for p in pairs}) != len(pairs):
    return s
  return "(" + ", ".join(p.group(2).strip() for p in sorted(pairs, key=lambda p: p.group(1))) + ")"


def structured_equal(gold: str, pred: str, scalar_equal) -> bool | None:
  """Compare by structure; None when neither side has structure (caller compares scalars)."""
  g_union, p_union = gold.split("\\cup"), pred.split("\\cup")
  if len(g_union) > 1 or len(p_union) > 1:  # unions: pieces in any order
    return len(g_union) == len(p_union) and _unordered_equal(
        g_union, p_union, lambda a, b: structured_equal(a.strip(), b.strip(), scalar_equal)
        is True)
  g_pair, p_pair = _enclosing_pair(gold), _enclosing_pair(pred)
  g_set, p_set = bool(g_pair and g_pair[0] == "{"), bool(p_pair and p_pair[0] == "{")
  if g_set or p_set:  # sets: order and repeats ignored; a bare answer list reads as a set
    other = p_pair if g_set else g_pair
    if other is not None and other[0] != "{":
      return False  # a set against a tuple or interval
    g_items = _expand_plus_minus(_split_top_level(g_pair[2] if g_set else gold))
    p_items = _expand_plus_minus(_split_top_level(p_pair[2] if p_set else pred))
    return _same_elements(g_items, p_items, scalar_equal)
  if g_pair and p_pair:
    g_items, p_items = _split_top_level(g_pair[2]), _split_top_level(p_pair[2])
    if len(g_items) == 1 and len(p_items) == 1:
      return None  # just parentheses around a scalar
    if len(g_items) != len(p_items):
      return False
    if (g_pair[0], g_pair[1]) != (p_pair[0], p_pair[1]):
      return False  # open vs closed interval ends, tuple vs interval
    return all(scalar_equal(a, b) for a, b in zip(g_items, p_items))
  if g_pair or p_pair:
    g_inner = g_pair[2] if g_pair and g_pair[0] == "(" else gold
    p_inner = p_pair[2] if p_pair and p_pair[0] == "(" else pred
    if "," in g_inner or "," in p_inner or (g_pair and g_pair[0] != "(") or (
        p_pair and p_pair[0] != "("):
      return False  # one side bracketed/structured, the other not
    return None
  g_items = _expand_plus_minus(_split_top_level(gold))
  p_items = _expand_plus_minus(_split_top_level(pred))
  if len(g_items) > 1 or len(p_items) > 1:  # answer lists such as "-2, 1": order-free
    return len(g_items) == len(p_items) and _unordered_equal(g_items, p_items, scalar_equal)
  return None


def _unordered_equal(golds: list[str], preds: list[str], scalar_equal) -> bool:
  """Multiset equality: each prediction matches one gold item."""
  remaining = list(preds)
  for g in golds:
    for j, p in enumerate(remaining):
      if scalar_equal(g, p):
        del remaining[j]
        break
    else:
      return False
  return not remaining


def _same_elements(golds: list[str], preds: list[str], scalar_equal) -> bool:
  """Set equality: every element of each side equals some element of the other."""
  if not any(golds) or not any(preds):
    return not any(golds) and not any(preds)
  return all(any(scalar_equal(g, p) for p in preds) for g in golds) and all(
      any(scalar_equal(g, p) for g in golds) for p in preds)


# ---------------------------------------------------------------------------
# SymPy comparison (runs inside the worker, or in-process without a time limit)
# ---------------------------------------------------------------------------


def _sympy_parse(source: str):
  import sympy  # pylint: disable=g-import-not-at-top  (heavy; only where used)
  from sympy.parsing import sympy_parser as sp  # pylint: disable=g-import-not-at-top
  names = {n: getattr(sympy, n) for n in ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc",
                                           "asin", "acos", "atan", "log", "exp", "pi", "oo",
                                           "factorial", "Integer", "Float", "Rational",
                                           "Symbol")}
  names.update(ln=sympy.log, abs=sympy.Abs, __builtins__={})
  local = {c: sympy.Symbol(c) for c in "abcdfghjklmnopqrstuvwxyzABCDFGHJKLMNOPQRTUVWXYZ"}
  local.update(e=sympy.E, E=sympy.E, i=sympy.I, I=sympy.I, S=sympy.Symbol("S"))
  transforms = sp.standard_transformations + (sp.implicit_multiplication_application,
                                              sp.convert_xor, sp.rationalize)
  return sp.parse_expr(source, local_dict=local, global_dict=names,
                       transformations=transforms, evaluate=True)


_DECIMAL = re.compile(r"(?<![\w.])(?:\d*\.\d+|\d+\.?)(?:[eE][-+]?\d+)?(?![\w.])")


def _significant_digits(source: str) -> int | None:
  """Fewest significant digits among the decimal literals of a source (None: no decimals)."""
  digits = []
  for literal in _DECIMAL.findall(source):
    mantissa = re.split(r"[eE]", literal)[0]
    if "." in mantissa or re.search(r"[eE]", literal):
      digits.append(max(1, len(mantissa.replace(".", "").lstrip("0"))))
  return min(digits) if digits else None


def _numbers_close(a, b, a_digits: int | None = None, b_digits: int | None = None) -> bool:
  """Numeric equality of two constant expressions (decimals already read as exact rationals).

  Exact forms (surds, pi, ...) agree to a relative 1e-12. When one side is written with
  decimals and the other is exact, the decimal must be the exact value correctly rounded to
  its digits, with at least `_MIN_DECIMAL_DIGITS` significant ones (3.1415927 is pi, 3.14 is
  not). Two decimal answers must be equal. Infinite or undefined values match only when
  identical (the caller's `==`).
  """
  import sympy  # pylint: disable=g-import-not-at-top
  if (a_digits is not None and b_digits is not None) or (
      a_digits is None and b_digits is None and a.is_Rational and b.is_Rational):
    return False  # both exact rationals, or both decimals: already compared with ==
  try:
    x, y = complex(a.evalf(30)), complex(b.evalf(30))
  except (TypeError, ValueError, AttributeError):
    return False
  if not all(cmath.isfinite(v) for v in (x, y)):
    return False
  digits, decimal = (a_digits, x) if a_digits is not None else (b_digits, y)
  if digits is None:
    return abs(x - y) <= 1e-12 * max(abs(x), abs(y))
  if digits < _MIN_DECIMAL_DIGITS or decimal == 0:
    return False
  exponent = int(sympy.floor(sympy.log(abs(decimal), 10)))  # of the leading digit
  return abs(x - y) <= 0.5 * 10.0 ** (exponent - digits + 1) * (1 + 1e-9)


def sympy_equal(gold_src: str, pred_src: str, mode: str = "") -> bool:
  """SymPy equivalence of two whitelisted sources (see `to_sympy_source`).

  mode: "" (equal values), "pct_gold" (the gold was a percentage: the prediction may be the
  number or the fraction, p or 100 p), "pct_pred" (the prediction was: p or p / 100),
  "ratio" (equation sides: equal up to a nonzero constant factor, 2y-4x-6 ~ y-2x-3).
  """
  import sympy  # pylint: disable=g-import-not-at-top
  try:
    g, p = _sympy_parse(gold_src), _sympy_parse(pred_src)
  except Exception:  # pylint: disable=broad-except  (SymPy raises many kinds)
    return False
  if mode == "ratio":
    try:
      r = sympy.simplify(g / p)
      return bool(r.is_number and r.is_finite and r != 0)
    except Exception:  # pylint: disable=broad-except
      return False
  g_digits, p_digits = _significant_digits(gold_src), _significant_digits(pred_src)
  candidates = [p] + ([p * 100] if mode == "pct_gold" else [p / 100] if mode == "pct_pred"
                      else [])
  for c in candidates:
    try:
      if g == c:
        return True
      if not g.free_symbols and not c.free_symbols:
        if _numbers_close(g, c, g_digits, p_digits):
          return True
        continue
      if sympy.simplify(g - c) == 0:
        return True
    except Exception:  # pylint: disable=broad-except
      continue
  return False


def _equation_sides(s: str) -> tuple[str, str] | None:
  parts = s.split("=")
  return (parts[0], parts[1]) if len(parts) == 2 and parts[0].strip() and parts[1].strip() \
      else None


def _unit_scales(g: _Normalized, p: _Normalized) -> tuple[str, str] | None:
  """Factors (SymPy source) that bring both values to one unit; None when the units measure
  different things (7 cm vs 7 kg; 7 cm vs 7 m differ through the factors). An angle in
  degrees against a bare value written with pi is converted to radians (60° = pi/3)."""
  gu, pu = g.unit, p.unit
  if gu == pu:
    return "1", "1"
  if gu is None or pu is None:
    unit, other = (gu, p.text) if pu is None else (pu, g.text)
    if unit == _Unit("deg", 1) and re.search(r"\\pi|π", other):
      return ("pi/180", "1") if pu is None else ("1", "pi/180")
    return "1", "1"
  g_dim, p_dim = _UNIT_FACTORS.get(gu.name), _UNIT_FACTORS.get(pu.name)
  if g_dim and p_dim and g_dim[0] == p_dim[0] and gu.power == pu.power:
    return str(g_dim[1] ** gu.power), str(p_dim[1] ** pu.power)
  return None


_ALGEBRA = re.compile(r"[\d+\-*/^()=\\]")


def equivalent(gold: str, pred: str, *, sympy_fn=sympy_equal) -> bool:
  """Normalise both answers and decide equivalence (SymPy via `sympy_fn(g_src, p_src, mode)`)."""
  if len(gold) > _MAX_ANSWER_CHARS or len(pred) > _MAX_ANSWER_CHARS:
    return False
  gn, pn = _normalize(gold), _normalize(pred)
  g, p = gn.text, pn.text
  if not g or not p:
    return False
  scales = _unit_scales(gn, pn)
  if scales is None:
    return False
  if g == p and scales[0] == scales[1]:
    return True
  split_letters = bool(_ALGEBRA.search(g) or _ALGEBRA.search(p))

  def source(x: str) -> str | None:
    return to_sympy_source(x, split_letters=split_letters)

  g_eq, p_eq = _equation_sides(g), _equation_sides(p)
  if g_eq and p_eq:  # two equations: the same relation, up to moving terms and scaling
    g_src, p_src = [source(x) for x in g_eq], [source(x) for x in p_eq]
    if None in g_src or None in p_src:
      return False
    return sympy_fn(f"({g_src[0]})-({g_src[1]})", f"({p_src[0]})-({p_src[1]})", "ratio")
  g, p = _assignments_as_tuple(g), _assignments_as_tuple(p)
  g, p = _strip_variable_prefix(g), _strip_variable_prefix(p)
  if g == p and scales[0] == scales[1]:
    return True
  mode = "" if gn.percent == pn.percent else "pct_gold" if gn.percent else "pct_pred"

  def scalar(a: str, b: str, scale: tuple[str, str] = ("1", "1")) -> bool:
    a, b = _strip_variable_prefix(a.strip()), _strip_variable_prefix(b.strip())
    if a == b and scale[0] == scale[1]:
      return True
    if a.lower() == b.lower() and not source(a):
      return True  # words such as "Evelyn" / "evelyn"
    a_src, b_src = source(a), source(b)
    if a_src is None or b_src is None:
      return _letter(a) is not None and _letter(a) == _letter(b)
    if scale[0] != scale[1]:
      a_src, b_src = f"({a_src})*({scale[0]})", f"({b_src})*({scale[1]})"
    return sympy_fn(a_src, b_src, mode)

  structured = structured_equal(g, p, scalar)
  return scalar(g, p, scales) if structured is None else structured


def _letter(s: str) -> str | None:
  m = re.fullmatch(r"\(?([A-Ea-e])\)?", s.strip())
  return m.group(1).upper() if m else None


# ---------------------------------------------------------------------------
# Worker processes with a time limit
# ---------------------------------------------------------------------------

MAX_WORKER_FAILURES_IN_A_ROW = 5  # failed start-ups / deaths, no comparison answered between
_SELF_CHECK_STARTUP_S = 120.0  # generous: once per process, maybe under heavy CPU load
_SELF_CHECK_PAIRS = ((("(1)/(2)", "0.5", ""), True), (("1", "2", ""), False))


def _worker_loop(conn, memory_bytes: int) -> None:
  import resource  # pylint: disable=g-import-not-at-top
  try:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  except (ValueError, OSError):
    pass
  try:  # import SymPy and its parser before saying "ready": start-up is not a job's time
    sympy_equal("1", "1")
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"worker start-up: {type(e).__name__}: {e}"))
    return
  conn.send(("ready", None))
  while True:
    try:
      job = conn.recv()
    except (EOFError, OSError):
      return
    try:
      conn.send(("ok", sympy_equal(*job)))
    except MemoryError:
      conn.send(("ok", False))
    except Exception as e:  # pylint: disable=broad-except
      conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
  """One SymPy worker process and its pipe. `close` is idempotent and safe from any thread."""

  def __init__(self, memory_bytes: int):
    self._memory_bytes = memory_bytes
    self._proc = None  # set only once the process has started
    self._conn = None

  def start(self, startup_timeout_s: float) -> str | None:
    """Starts the process and waits until it is ready (SymPy imported); None, or why not
    (the process is then killed)."""
    # spawn, not fork: the trainer has threads, and a forked child can inherit a held lock.
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_loop, args=(child, self._memory_bytes), daemon=True,
                       name="kat-math-worker")
    try:
      proc.start()
    except Exception as e:  # pylint: disable=broad-except  (OS limits, a bootstrapping child)
      parent.close()
      return f"could not start a process: {type(e).__name__}: {e}"
    finally:
      child.close()
    self._proc, self._conn = proc, parent
    try:
      if not parent.poll(startup_timeout_s):
        why = f"did not report ready within {startup_timeout_s:g} s"
      else:
        kind, value = parent.recv()
        why = None if kind == "ready" else str(value)
    except (EOFError, OSError):
      why = f"ended before reporting ready ({self.exit_status()})"
    if why is not None:
      self.close()
    return why

  def alive(self) -> bool:
    proc = self._proc
    return proc is not None and proc.is_alive()

  def exit_status(self) -> str:
    proc = self._proc
    if proc is None:
      return "closed"
    proc.join(timeout=0.5)
    return f"exit code {proc.exitcode}"

  def ask(self, job: tuple[str, str, str], timeout_s: float) -> tuple[str, Any]:
    """("ok", bool) / ("error", message) from the worker, ("timeout", None) after
    `timeout_s`, or ("died", why) when the process ended or the pipe broke."""
    conn = self._conn
    if conn is None:
      return "died", "closed"
    try:
      conn.send(job)
      if not conn.poll(max(timeout_s, 0.0)):
        return "timeout", None
      return conn.recv()
    except (EOFError, OSError, ValueError):  # ValueError: closed by another thread
      return "died", f"ended during a comparison ({self.exit_status()})"

  def close(self) -> None:
    proc, conn = self._proc, self._conn
    self._proc = self._conn = None
    if proc is not None:
      try:
        proc.kill()
        proc.join(timeout=1.0)
      except (OSError, ValueError, AttributeError):  # already gone or closed
        pass
    if conn is not None:
      conn.close()


def _self_check() -> str | None:
  """Why SymPy workers cannot be trusted to grade math, or None: one must start within
  `_SELF_CHECK_STARTUP_S` and grade 1/2 = 0.5 and 1 != 2."""
  worker = _Worker(memory_bytes=2 << 30)
  try:
    why = worker.start(_SELF_CHECK_STARTUP_S)
    if why is not None:
      return why
    for job, want in _SELF_CHECK_PAIRS:
      got = worker.ask(job, _SELF_CHECK_STARTUP_S)
      if got != ("ok", want):
        return f"{job[0]} vs {job[1]} gave {got}, expected ('ok', {want})"
    return None
  finally:
    worker.close()


def _new_health() -> InfrastructureHealth:
  # `_self_check` is looked up at each call, so tests can replace it.
  return InfrastructureHealth("the math checker's SymPy worker", lambda: _self_check(),
                              MAX_WORKER_FAILURES_IN_A_ROW)


_HEALTH = _new_health()


def check_workers() -> None:
  """Runs the SymPy workers' start-up self-check now (once per process; later calls only
  re-raise a failure): RewardInfrastructureError when no worker can start and grade."""
  _HEALTH.ensure_checked()


class MathVerdict(NamedTuple):
  """equal: the answers are equivalent. status: 'ok'; 'timeout' (not equal after a SymPy
  comparison hit `timeout_s` or the answer's `budget_s`: the answer's doing, e.g. a power
  tower); 'error' (not equal after the worker died during a comparison). detail: why."""
  equal: bool
  status: str = "ok"
  detail: str = ""


class _Call(threading.local):
  """Per calling thread: one answer's comparison seconds and what went wrong."""
  spent_s = 0.0
  problem: tuple[str, str] | None = None  # (status, detail)


class MathChecker:
  """Answer equivalence with the SymPy step in a worker process bounded by `timeout_s`.

  Thread-safe; several threads share one worker (calls are serialised), so use one
  checker per scoring thread for parallelism (`pool.py` does). A timed-out worker is killed
  and replaced; that comparison counts as not equivalent (`timeouts` goes up).

  `timeout_s` bounds one SymPy comparison; `budget_s` (default 3 x timeout_s) bounds the
  comparison time of one answer (a list or set answer makes one per pair of elements), after
  which the rest count as not equivalent (`budget_exhausted` goes up). Only comparison time
  counts: worker start-up and waiting for another thread's comparison do not, and both run
  as `infrastructure_time()`, so a `RewardPool` item's limit leaves them out too.

  Workers are infrastructure (`health.py`): the first use in a process runs a self-check
  (a worker must start and grade known pairs), a worker must report ready (interpreter up,
  SymPy imported) within `startup_timeout_s` and is retried until it does, and
  `MAX_WORKER_FAILURES_IN_A_ROW` failed start-ups or deaths with no comparison answered
  between raise `RewardInfrastructureError`, so a broken worker never grades answers 0.
  """

  def __init__(self, timeout_s: float = 5.0, memory_bytes: int = 2 << 30,
               startup_timeout_s: float = 120.0, budget_s: float | None = None):
    if timeout_s <= 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if budget_s is not None and budget_s <= 0:
      raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if startup_timeout_s <= 0:
      raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
    self.timeout_s = timeout_s
    self.budget_s = 3 * timeout_s if budget_s is None else budget_s
    self.startup_timeout_s = startup_timeout_s
    self.memory_bytes = memory_bytes
    self._lock = threading.Lock()
    self._worker: _Worker | None = None
    self._call = _Call()
    self.timeouts = 0  # comparisons that hit timeout_s
    self.budget_exhausted = 0  # answers whose comparisons ran past budget_s
    self.startup_failures = 0  # workers that could not start (each retried)
    _LIVE_CHECKERS.add(self)

  def close(self) -> None:
    """Kills the worker (a later comparison starts a fresh one). Never waits for a
    comparison in progress, so it is safe at interpreter exit."""
    worker, self._worker = self._worker, None
    if worker is not None:
      worker.close()

  def _ready_worker(self) -> _Worker:
    """The live worker, starting one (retried until ready) if needed; caller holds _lock."""
    worker = self._worker
    if worker is not None and worker.alive():
      return worker
    if worker is not None:  # died between comparisons (e.g. killed by the OS)
      self.close()
      _HEALTH.record(f"ended between comparisons ({worker.exit_status()})")
    with infrastructure_time():
      while True:
        worker = _Worker(self.memory_bytes)
        why = worker.start(self.startup_timeout_s)
        if why is None:
          self._worker = worker
          return worker
        self.startup_failures += 1
        _HEALTH.record(why)  # raises at the bound

  def _compare(self, gold_src: str, pred_src: str, mode: str = "") -> bool:
    call = self._call
    with infrastructure_time():  # another thread's comparison is not this answer's time
      self._lock.acquire()  # pylint: disable=consider-using-with
    try:
      if call.spent_s >= self.budget_s:
        self.budget_exhausted += 1
        call.problem = ("timeout", f"the answer's SymPy budget of {self.budget_s:g} s ran out")
        return False
      worker = self._ready_worker()
      limit = min(self.timeout_s, self.budget_s - call.spent_s)
      started = time.monotonic()
      kind, value = worker.ask((gold_src, pred_src, mode), limit)
      call.spent_s += time.monotonic() - started
      if kind == "timeout":  # stuck in SymPy: kill it; the next call starts a fresh worker
        self.timeouts += 1
        self.close()
        call.problem = ("timeout", f"a SymPy comparison ran past its limit of {limit:.3g} s")
        return False
      if kind == "died":
        self.close()
        call.problem = ("error", f"the SymPy worker {value}")
        if not _EXITING.is_set():  # at exit, close() ends workers in use: not a failure
          _HEALTH.record(value)  # raises at the bound
        return False
      _HEALTH.record(None)  # the worker answered
      return kind == "ok" and bool(value)
    finally:
      self._lock.release()

  def verdict(self, gold: str, pred: str) -> MathVerdict:
    """Is `pred` equivalent to `gold`, and if not, did a limit or the worker decide it?
    Raises `RewardInfrastructureError` only (workers cannot run); never for string inputs."""
    _HEALTH.ensure_checked()
    call = self._call
    call.spent_s, call.problem = 0.0, None
    try:
      equal = equivalent(gold, pred, sympy_fn=self._compare)
    except RewardInfrastructureError:
      raise
    except Exception:  # pylint: disable=broad-except
      equal = False
    if equal or call.problem is None:
      return MathVerdict(equal)
    return MathVerdict(False, *call.problem)

  def equal(self, gold: str, pred: str) -> bool:
    """Is `pred` equivalent to `gold`? Raises `RewardInfrastructureError` only."""
    return self.verdict(gold, pred).equal


_LIVE_CHECKERS: weakref.WeakSet[MathChecker] = weakref.WeakSet()
_EXITING = threading.Event()


@atexit.register
def _close_all_checkers() -> None:
  _EXITING.set()
  for checker in list(_LIVE_CHECKERS):
    checker.close()


_DEFAULT_CHECKER: MathChecker | None = None
_DEFAULT_LOCK = threading.Lock()


def default_checker() -> MathChecker:
  global _DEFAULT_CHECKER
  with _DEFAULT_LOCK:
    if _DEFAULT_CHECKER is None:
      _DEFAULT_CHECKER = MathChecker()
    return _DEFAULT_CHECKER


def _check_str(**values: Any) -> None:
  for name, value in values.items():
    if not isinstance(value, str):
      raise ValueError(f"{name} must be str, got {type(value).__name__}")


def math_equal(gold: str, pred: str, *, checker: MathChecker | None = None,
               in_process: bool = False) -> bool:
  """Answer equivalence. in_process=True skips the worker (no time limit: trusted inputs)."""
  _check_str(gold=gold, pred=pred)
  if in_process:
    try:
      return equivalent(gold, pred)
    except Exception:  # pylint: disable=broad-except
      return False
  return (checker or default_checker()).equal(gold, pred)


def math_verdict(response: str, gold: str, *,
                 checker: MathChecker | None = None) -> MathVerdict:
  """The response's final answer against `gold` in a worker (see `MathChecker.verdict`);
  a response without an answer is not equal, status 'ok'."""
  _check_str(gold=gold)
  pred = extract_math_answer(response)
  if pred is None:
    return MathVerdict(False)
  return (checker or default_checker()).verdict(gold, pred)


def math_reward(response: str, gold: str, *, checker: MathChecker | None = None,
                in_process: bool = False) -> float:
  """1.0 if the response's final answer is equivalent to `gold`, else 0.0."""
  if not in_process:
    return 1.0 if math_verdict(response, gold, checker=checker).equal else 0.0
  pred = extract_math_answer(response)
  if pred is None:
    return 0.0
  return 1.0 if math_equal(gold, pred, in_process=True) else 0.0


def gold_from_verifier(verifier: Mapping[str, Any]) -> str:
  """Reference answer of a math verifier spec: field 'answer' (ours) or 'value' (autothink)."""
  for key in ("answer", "value"):
    if key in verifier:
      return str(verifier[key])
  raise ValueError(f"math verifier needs 'answer' or 'value': {dict(verifier)!r}")
