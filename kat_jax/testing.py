"""Numerical comparison helpers shared by the tests, benchmarks and notebooks."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def relative_error(actual: Any, expected: Any) -> float:
  """||actual - expected|| / ||expected|| in float64 (0 when both are zero). NaN propagates."""
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  denom = np.linalg.norm(e)
  diff = np.linalg.norm(a - e)
  return float(diff / denom) if denom > 0 else float(diff)


def assert_trees_close(actual: Any, expected: Any, *, rtol: float) -> None:
  """Asserts equal tree structure and a relative error below `rtol` for every leaf."""
  a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
  if a_def != e_def:
    raise AssertionError(f"tree structures differ:\n{a_def}\nvs\n{e_def}")
  for (path, a), (_, e) in zip(a_leaves, e_leaves):
    err = relative_error(a, e)
    if not err < rtol:  # also catches NaN
      raise AssertionError(f"{jax.tree_util.keystr(path)}: relative error {err:.3e} >= {rtol}")
