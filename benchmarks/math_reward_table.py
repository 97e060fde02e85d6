"""The math reward and math-verify against the hand-written table of true verdicts.

    python benchmarks/math_reward_table.py --out benchmarks/results/math_reward_table_cpu.json

Per list of `tests/tasks/rewards/math_table.py` (written before the fix, after it, attacks):
agreement of our verdict and of math-verify's (gold as `$gold$`, the response as written) with
the true verdict, wrong answers each rewards, and our agreement with math-verify. The test
`tests/tasks/rewards/test_rewards_math_table.py` asserts the targets; this records the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tasks", "rewards"))
from math_table import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    MATH_TABLE, MATH_TABLE_ATTACKS, MATH_TABLE_LATER)

from kat_jax.tasks.rewards import math as math_lib  # pylint: disable=wrong-import-position


def math_verify_verdict(gold: str, response: str) -> bool:
  import math_verify  # pylint: disable=g-import-not-at-top  (a test dependency)
  try:
    return bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(response)))
  except Exception:  # pylint: disable=broad-except  (counts as "not verified")
    return False


def summarize(rows) -> dict[str, float]:
  truth = [t for *_, t in rows]
  ours = [math_lib.math_reward(r, g, in_process=True) == 1.0 for _, g, r, _ in rows]
  theirs = [math_verify_verdict(g, r) for _, g, r, _ in rows]
  agree = lambda a, b: sum(x == y for x, y in zip(a, b)) / len(rows)
  rewarded_wrong = lambda v: sum(x and not t for x, t in zip(v, truth))
  return {"rows": len(rows), "ours_vs_truth": agree(ours, truth),
          "ours_wrong_rewarded": rewarded_wrong(ours),
          "math_verify_vs_truth": agree(theirs, truth),
          "math_verify_wrong_rewarded": rewarded_wrong(theirs),
          "ours_vs_math_verify": agree(ours, theirs)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  lists = {"MATH_TABLE": MATH_TABLE, "MATH_TABLE_LATER": MATH_TABLE_LATER,
           "MATH_TABLE_ATTACKS": MATH_TABLE_ATTACKS,
           "all": MATH_TABLE + MATH_TABLE_LATER + MATH_TABLE_ATTACKS}
  record = {"command": " ".join(["python", *sys.argv]),
            "lists": {name: summarize(rows) for name, rows in lists.items()}}
  print(f"{'list':<20} {'rows':>5} {'ours=truth':>11} {'ours FP':>8} {'mv=truth':>9} "
        f"{'mv FP':>6} {'ours=mv':>8}")
  for name, s in record["lists"].items():
    print(f"{name:<20} {s['rows']:>5} {s['ours_vs_truth']:>11.3f} {s['ours_wrong_rewarded']:>8} "
          f"{s['math_verify_vs_truth']:>9.3f} {s['math_verify_wrong_rewarded']:>6} "
          f"{s['ours_vs_math_verify']:>8.3f}")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  main()
