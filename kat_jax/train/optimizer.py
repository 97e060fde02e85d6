"""AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:  # any object with these attributes works (benchmarks pass a namespace)
  from ml_collections import ConfigDict


def learning_rate_schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `optim.lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def _decay_mask(params) -> dict:
  """Weight decay on matrices only: norms' scales and biases are left alone."""
  def keep(path, _) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any("norm" in n or n.endswith("bias") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """optim: lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2, eps, clip_norm (0 = off)."""
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.clip_norm and optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
