"""Comparison plots: per checkpoint, bars of accuracy and think-on rate, and mean output tokens
(the layout of the KAT-V1 report's Figures 7-9, which compare models on those quantities)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  backend = str(matplotlib.get_backend()).lower()
  if "inline" not in backend and "ipykernel" not in backend:
    matplotlib.use("Agg")  # files only; notebooks keep their inline backend
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _value(summary: Mapping[str, Any], key: str) -> float:
  value = summary.get(key)
  return float("nan") if value is None else float(value)


def plot_comparison(checkpoints: Mapping[str, Mapping[str, Any]],
                    path: str | os.PathLike | None = None):
  """One row per benchmark: [accuracy, think-on rate] bars per checkpoint | mean tokens.

  checkpoints: {label: {benchmark: summary, ...}} (non-dict entries such as 'path' ignored).
  Returns the figure; saved to `path` when given.
  """
  plt = _pyplot()
  labels = list(checkpoints)
  if not labels:
    raise ValueError("plot_comparison needs at least one checkpoint")
  names = sorted({b for c in checkpoints.values() for b, s in c.items() if isinstance(s, dict)})
  fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.2 * len(names)), squeeze=False)
  x = np.arange(len(labels))
  for row, name in enumerate(names):
    summaries = [checkpoints[c].get(name, {}) for c in labels]
    ax = axes[row, 0]
    ax.bar(x - 0.2, [_value(s, "accuracy") for s in summaries], 0.4, label="accuracy")
    ax.bar(x + 0.2, [_value(s, "think_on_rate") for s in summaries], 0.4, label="think-on rate")
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: accuracy and think-on rate")
    ax.legend(fontsize=8)
    ax = axes[row, 1]
    ax.bar(x, [_value(s, "mean_output_tokens") for s in summaries], 0.5, color="tab:green")
    ax.set_title(f"{name}: mean output tokens")
    for ax in axes[row]:
      ax.set_xticks(x, labels, rotation=15, fontsize=8)
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def plot_rl_dynamics(history: Sequence[Mapping[str, Any]],
                     path: str | os.PathLike | None = None):
  """Step-SRPO dynamics from `rl_curves.json`'s history: reward, think-on rate easy vs hard,
  and response tokens per step. Returns the figure; saved to `path` when given."""
  plt = _pyplot()
  if not history:
    raise ValueError("plot_rl_dynamics needs a non-empty history")
  steps = [h.get("step", i + 1) for i, h in enumerate(history)]
  get = lambda key: [_value(h, key) for h in history]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  axes[0].plot(steps, get("reward"), marker=".")
  axes[0].set_title("reward")
  axes[1].plot(steps, get("think_on_rate_easy"), marker=".", label="easy")
  axes[1].plot(steps, get("think_on_rate_hard"), marker=".", label="hard")
  axes[1].set_ylim(0, 1)
  axes[1].set_title("think-on rate")
  axes[1].legend()
  axes[2].plot(steps, get("response_tokens"), marker=".", color="tab:green")
  axes[2].set_title("response tokens")
  for ax in axes:
    ax.set_xlabel("step")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig
