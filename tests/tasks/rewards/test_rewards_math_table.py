"""The math reward on a hand-written table of true verdicts (`math_table.py`), math-verify 0.9
on the same table, and the worker's limits on adversarial answers."""

from __future__ import annotations

import functools
import os
import random
import sys
from fractions import Fraction

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from math_table import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    MATH_TABLE, MATH_TABLE_ATTACKS, MATH_TABLE_LATER)

from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=wrong-import-position

ROWS = MATH_TABLE + MATH_TABLE_LATER + MATH_TABLE_ATTACKS
CATEGORIES = {"fraction", "mixed", "radical", "pi_e", "percent", "interval", "set", "tuple",
              "units", "scientific", "equation", "sentence", "wrong", "attack"}

# Rows where our reward differs from the true verdict: (gold, response) -> reason.
OUR_MISSES: dict[tuple[str, str], str] = {}

# Rows where math-verify 0.9 (gold parsed as `$gold$`, the response as written, default
# extraction) differs from the true verdict: (gold, response) -> reason.
MATH_VERIFY_MISSES = {
    ("4\\frac{1}{2}", "\\boxed{4 1/2}"): "plain-text mixed number read as 4 * 1/2 = 2",
    ("\\frac{9}{2}", "She needs 4 1/2 cups of flour."): "plain-text mixed number read as 2",
    ("-1", "\\boxed{e^{i\\pi}}"): "e^{i pi} is not evaluated to -1",
    ("33\\frac{1}{3}\\%", "\\boxed{\\frac{1}{3}}"): "mixed number inside a percentage",
    ("(-\\infty, 3]", "\\boxed{x \\le 3}"): "inequality not compared with an interval",
    ("(2, \\infty)", "\\boxed{x > 2}"): "inequality not compared with an interval",
    ("[-1, 4)", "\\boxed{-1 \\le x < 4}"): "inequality not compared with an interval",
    ("(0, \\infty)", "\\boxed{x > 0}"): "inequality not compared with an interval",
    ("[-2, 2]", "\\boxed{-2 \\leq x \\leq 2}"): "inequality not compared with an interval",
    ("\\emptyset", "\\boxed{\\varnothing}"): "\\varnothing not read as the empty set",
    ("\\{1, 2\\}", "\\boxed{(1, 2)}"): "FALSE POSITIVE: a tuple accepted for a set",
    ("(1, -1, 2)", "\\boxed{\\langle 1, -1, 2 \\rangle}"): "angle-bracket vector not read",
    ("(1, -1, 2)", "\\boxed{\\begin{pmatrix} 1 \\\\ -1 \\\\ 2 \\end{pmatrix}}"):
        "column vector not compared with a tuple",
    ("20", "\\boxed{20 cm^2}"): "squared unit without \\text not dropped",
    ("60", "\\boxed{60 km/h}"): "compound unit without \\text not dropped",
    ("7 \\text{ cm}", "\\boxed{7 \\text{ m}}"): "FALSE POSITIVE: units dropped on both sides",
    ("1 \\text{ m}", "\\boxed{100 \\text{ cm}}"): "no unit conversion",
    ("5 \\text{ kg}", "\\boxed{5000 \\text{ g}}"): "no unit conversion",
    ("15 \\text{ minutes}", "\\boxed{\\frac{1}{4} \\text{ hour}}"): "no unit conversion",
    ("15 \\text{ minutes}", "\\boxed{15 \\text{ hours}}"):
        "FALSE POSITIVE: units dropped on both sides",
    ("2500 \\text{ m}", "\\boxed{2.5 \\text{ km}}"): "no unit conversion",
    ("3 \\times 10^{8}", "\\boxed{3e8}"): "E-notation read as 3 * e * 8",
    ("1.5 \\times 10^{-3}", "\\boxed{1.5e-3}"): "E-notation read with e = 2.718...",
    ("7 \\times 10^{-9}", "\\boxed{7.0e-9}"): "E-notation read with e = 2.718...",
    ("6.02 \\times 10^{23}", "\\boxed{602 \\times 10^{21}}"):
        "the float 6.02e23 and the integer 602e21 compared by rounding at the gold's digits",
    ("-3, 2", "So x = 2 or x = -3."): "only the last value of the sentence is extracted",
    ("\\frac{3}{7}", "\\boxed{0.428571}"):
        "FALSE POSITIVE: a 6-digit rounding accepted for an exact fraction",
    ("1.2 \\times 10^{-31}", "\\boxed{1.3 \\times 10^{-31}}"):
        "FALSE POSITIVE: tiny numbers compared with an absolute tolerance",
    ("5", "The answer is not 5."): "FALSE POSITIVE: a negated answer accepted",
    ("5", "\\boxed{5\\text{ (or 6)}}"): "FALSE POSITIVE: a hedge in \\text dropped as a unit",
    ("5", "\\boxed{5 \\text{ squared}}"): "FALSE POSITIVE: 'squared' dropped as a unit",
    ("5", "The answer is 5 squared."): "FALSE POSITIVE: 'squared' dropped",
    ("5", "The answer is 5 thousand."): "FALSE POSITIVE: 'thousand' dropped",
    ("5000", "The answer is 5 thousand."): "'thousand' not read as a multiplier",
    ("5", "\\boxed{5 \\text{ thousand}}"): "FALSE POSITIVE: 'thousand' dropped as a unit",
    ("24", "\\boxed{2 \\text{ dozen}}"): "'dozen' not read as a multiplier",
    ("2ab", "\\boxed{2ba}"): "the product ba not matched with ab",
    ("10", "\\boxed{10 \\text{ cm or } 12 \\text{ cm}}"):
        "FALSE POSITIVE: a hedge between two \\text units dropped",
    ("3", "x = 3 is not correct."): "FALSE POSITIVE: a negated answer accepted",
    ("4", "So x = 3, not 4."): "FALSE POSITIVE: the negated last value taken",
    ("3", "So x = 3, not 4."): "the negated last value taken instead of the stated one",
    ("6", "It is $5$, not $6$."): "FALSE POSITIVE: the negated last value taken",
    ("\\frac{\\pi}{3}", "\\boxed{60^\\circ}"): "degrees not converted to radians",
    ("\\pi", "\\boxed{180 \\text{ degrees}}"): "degrees not converted to radians",
}


@functools.lru_cache(maxsize=None)
def _our_verdicts() -> tuple[bool, ...]:
  return tuple(math_lib.math_reward(response, gold, in_process=True) == 1.0
               for _, gold, response, _ in ROWS)


def _agreement(a, b) -> float:
  return sum(x == y for x, y in zip(a, b)) / len(a)


def test_table_has_200_rows_and_both_verdicts_in_every_category():
  assert len(ROWS) >= 200
  assert len({(g, r) for _, g, r, _ in ROWS}) == len(ROWS), "duplicate rows"
  for category in CATEGORIES:
    verdicts = {truth for c, _, _, truth in ROWS if c == category}
    assert verdicts == {True, False}, category


def test_no_wrong_answer_is_rewarded():
  false_positives = [(g, r) for (_, g, r, truth), ours in zip(ROWS, _our_verdicts())
                     if ours and not truth]
  assert not false_positives


def test_agreement_with_truth_is_at_least_97_percent_and_every_miss_is_listed():
  truths = [truth for *_, truth in ROWS]
  misses = {(g, r) for (_, g, r, truth), ours in zip(ROWS, _our_verdicts()) if ours != truth}
  assert misses == set(OUR_MISSES)
  assert _agreement(_our_verdicts(), truths) >= 0.97


def test_math_verify_disagrees_with_truth_exactly_on_the_listed_rows():
  math_verify = pytest.importorskip(
      "math_verify", reason="math-verify is a test dependency (setup.py extras 'test')")
  theirs = []
  for _, gold, response, _ in ROWS:
    try:
      theirs.append(bool(math_verify.verify(math_verify.parse(f"${gold}$"),
                                            math_verify.parse(response))))
    except Exception:  # pylint: disable=broad-except  (counts as "not verified")
      theirs.append(False)
  truths = [truth for *_, truth in ROWS]
  misses = {(g, r) for (_, g, r, truth), v in zip(ROWS, theirs) if v != truth}
  assert misses == set(MATH_VERIFY_MISSES)
  print(f"\n{len(ROWS)} rows: ours vs truth {_agreement(_our_verdicts(), truths):.4f}, "
        f"math-verify vs truth {_agreement(theirs, truths):.4f}, "
        f"ours vs math-verify {_agreement(_our_verdicts(), theirs):.4f}")


def test_worker_gives_the_in_process_verdicts_on_every_tenth_row():
  checker = math_lib.MathChecker(timeout_s=10.0)
  try:
    for i in range(0, len(ROWS), 10):
      _, gold, response, _ = ROWS[i]
      got = math_lib.math_reward(response, gold, checker=checker) == 1.0
      assert got is _our_verdicts()[i], (gold, response)
    assert checker.timeouts == 0 and checker.budget_exhausted == 0
  finally:
    checker.close()


def test_set_of_power_towers_stops_at_the_answer_budget_and_the_next_answer_is_graded():
  checker = math_lib.MathChecker(timeout_s=1.0, budget_s=1.5)
  try:
    assert checker.equal("1", "1.0")
    tower = ", ".join(["9^9^9^9"] * 6)
    assert not checker.equal("\\{1, 2, 3, 4, 5, 6\\}", f"\\{{{tower}\\}}")
    assert checker.timeouts <= 2 and checker.budget_exhausted >= 1  # not 36 timeouts
    assert checker.equal("\\{1, 2\\}", "\\{2, 1, 1\\}")  # the budget is per answer
  finally:
    checker.close()
  with pytest.raises(ValueError, match="budget_s"):
    math_lib.MathChecker(budget_s=0)


@pytest.mark.parametrize("response", [
    "\\boxed{" * 200_000 + "1",  # unclosed boxes: one linear brace scan
    "\\boxed{" + "1+" * 500_000 + "1}",  # a giant answer: not compared
    "\\boxed{" + "(" * 2_000 + "1" + ")" * 2_000 + "}",  # deep nesting
    "The answer is " + "x = 1 or " * 100_000 + "x = 2.",
    "$" * 300_000,
], ids=["unclosed_boxes", "giant_sum", "deep_nesting", "long_or_list", "dollar_flood"])
def test_giant_responses_score_zero_in_process(response):
  assert math_lib.math_reward(response, "2", in_process=True) == 0.0


def _written_forms(q: Fraction) -> list[str]:
  """Ways to write the rational q: fraction, slash, mixed number, decimal, percent, ..."""
  n, d = q.numerator, q.denominator
  forms = [f"\\frac{{{n}}}{{{d}}}" if d != 1 else str(n)]
  if d != 1:
    forms += [f"{n}/{d}", f"\\dfrac{{{n}}}{{{d}}}"]
    if abs(n) > d:
      whole, rest = divmod(abs(n), d)
      sign = "-" if n < 0 else ""
      forms += [f"{sign}{whole}\\frac{{{rest}}}{{{d}}}", f"{sign}{whole} {rest}/{d}"]
  if 10**6 % d == 0:  # a terminating decimal, and the same value as a percentage
    forms += [f"{float(q):.6f}".rstrip("0").rstrip("."),
              f"{float(q * 100):.4f}".rstrip("0").rstrip(".") + "\\%"]
  if d == 1 and abs(n) >= 1000:
    forms += [f"{n:,}", f"{n / 1000:g} \\times 10^{{3}}"]
  return forms


def test_generated_numbers_in_any_written_form_match_exactly_when_equal():
  rng = random.Random(0)
  wraps = ["\\boxed{%s}", "The answer is $%s$.", "So x = %s.", "**Final Answer:** %s"]
  wrong = []
  for _ in range(300):
    a = Fraction(rng.randint(-3000, 3000), rng.choice([1, 2, 3, 4, 7, 8, 100]))
    b = rng.choice([a, a, a + Fraction(rng.choice([1, -1]), rng.choice([1, 10, 1000])),
                    Fraction(rng.randint(-3000, 3000), rng.choice([1, 2, 5]))])
    gold, response = rng.choice(_written_forms(a)), rng.choice(wraps) % rng.choice(
        _written_forms(b))
    if (math_lib.math_reward(response, gold, in_process=True) == 1.0) != (a == b):
      wrong.append((gold, response, a == b))
  assert not wrong


def test_generated_tuples_sets_intervals_and_equations_match_only_when_equal():
  rng = random.Random(1)
  wrong = []
  for _ in range(200):
    kind = rng.choice(["tuple", "set", "interval", "equation"])
    if kind == "tuple":
      a = [rng.randint(-9, 9) for _ in range(rng.randint(2, 3))]
      b = list(a)
      if rng.random() < 0.4:
        b[rng.randrange(len(b))] += 1
      gold, truth = f"({', '.join(map(str, a))})", a == b
      pred = f"\\left({', '.join(map(str, b))}\\right)"
    elif kind == "set":
      a = sorted({rng.randint(-9, 9) for _ in range(rng.randint(1, 4))})
      b = a + rng.choice([[], [a[0]], [max(a) + 1]])
      rng.shuffle(b)
      gold, truth = f"\\{{{', '.join(map(str, a))}\\}}", set(a) == set(b)
      pred = f"\\{{{', '.join(map(str, b))}\\}}"
    elif kind == "interval":
      lo, hi = sorted(rng.sample(range(-9, 10), 2))
      ends = rng.choice("(["), rng.choice(")]")
      pred_ends = (rng.choice("(["), rng.choice(")]"))
      op = {"(": "<", "[": "\\le", ")": "<", "]": "\\le"}
      gold = f"{ends[0]}{lo}, {hi}{ends[1]}"
      pred = f"{lo} {op[pred_ends[0]]} x {op[pred_ends[1]]} {hi}"
      truth = ends == pred_ends
    else:
      m, c, k = rng.randint(-5, 5), rng.randint(-5, 5), rng.choice([1, 2, -3])
      shift = rng.choice([0, 0, 1])
      gold, truth = f"y = {m}x + {c}", shift == 0
      pred = f"{k}y = {k * m}x + {k * (c + shift)}"
    if (math_lib.math_reward(f"\\boxed{{{pred}}}", gold, in_process=True) == 1.0) != truth:
      wrong.append((gold, pred, truth))
  assert not wrong
