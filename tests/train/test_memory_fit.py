"""kat_jax.train.memory_fit: the first option whose bytes fit, measuring no further, and the
lines that say why."""

import jax
import numpy as np

from kat_jax.train.memory_fit import first_fit, gib, tree_bytes

MIB = 2**20


def _plan(limit, scratch):
  """Three options a < b < c in preference; a step needs 10 MiB + its scratch."""
  measured = []

  def measure(option):
    measured.append(option)
    return scratch[option]

  fit = first_fit("step", [("option a", "a"), ("option b", "b"), ("option c", "c")], limit,
                  measure, lambda option, temp: (10 * MIB + temp, f"10.0 MiB + {gib(temp)}"),
                  " (why)")
  return fit, measured


def test_first_fit_takes_the_first_option_that_fits_and_measures_none_after_it():
  scratch = {"a": 30 * MIB, "b": 20 * MIB, "c": 5 * MIB}
  fit, measured = _plan(31 * MIB, scratch)
  assert (fit.choice, measured) == ("b", ["a", "b"])
  assert fit.scratch == {"a": 30 * MIB, "b": 20 * MIB}
  assert fit.line == ("step uses option b: option a: 10.0 MiB + 30.0 MiB = 40.0 MiB > 31.0 MiB "
                      "usable; option b: 10.0 MiB + 20.0 MiB = 30.0 MiB fits")
  fit, measured = _plan(40 * MIB, scratch)  # the first fits: no line, its arithmetic kept
  assert (fit.choice, fit.line, measured) == ("a", "", ["a"])
  assert fit.tried == ["option a: 10.0 MiB + 30.0 MiB = 40.0 MiB"]


def test_first_fit_says_why_nothing_fits_and_checks_nothing_without_a_limit():
  scratch = {"a": 30 * MIB, "b": 20 * MIB, "c": 5 * MIB}
  fit, measured = _plan(15 * MIB - 1, scratch)
  assert fit.choice is None and measured == ["a", "b", "c"]
  assert fit.line.startswith("step does not fit: option a: ") and fit.line.endswith(
      "option c: 10.0 MiB + 5.0 MiB = 15.0 MiB > 15.0 MiB usable (why)")
  fit, measured = _plan(None, scratch)
  assert (fit.choice, fit.line, measured) == ("a", "", [])
  fit, measured = _plan(31 * MIB, {"a": None})  # no memory analysis: the first, unchecked
  assert fit.choice == "a" and "reports no memory analysis" in fit.line


def test_tree_bytes_counts_concrete_and_abstract_leaves():
  tree = {"w": np.zeros((3, 4), np.float32), "s": jax.ShapeDtypeStruct((5,), np.int8)}
  assert tree_bytes(tree) == 3 * 4 * 4 + 5
  assert (gib(3 * 2**30 // 2), gib(5 * MIB)) == ("1.50 GiB", "5.0 MiB")
