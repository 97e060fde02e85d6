"""Layer saturation: how much each decoder layer changes the residual stream.

For layer l with residual input x_l and output x_{l+1} (the stream entering layer l+1), the
per-token cosine cos(x_l[t], x_{l+1}[t]) is close to 1 when the layer is near-identity. Yi
(arXiv 2403.04652, "Dive deeper into Yi-9B") and KAT-V1 (report §2) pick the layers to duplicate
from this measure; ShortGPT (arXiv 2403.03853) calls `1 - E[cos]` the Block Influence.

The layer stack is run here as our own `lax.scan` of `DecoderBlock` over the stacked `layers`
params (the same module `Decoder` scans), so the statistics are computed inside the scan body and
nothing but per-layer sums ever leaves a batch: memory is one batch of hidden states whatever
the number of batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model.config import ModelConfig
from kat_jax.model.decoder import Decoder, DecoderBlock
from kat_jax.model.layers import rope_cos_sin

# Per-layer sums returned by one batch: [L] float32 each (count is a scalar).
_SUM_KEYS = ("cos_sum", "cos_sq_sum", "cos_min")


def _embed(config: ModelConfig, params: Mapping, tokens: jax.Array) -> jax.Array:
  """tokens [B,T] -> embeddings [B,T,d] in the compute dtype, exactly as `Decoder` does."""
  h = Decoder(config).apply({"params": params}, tokens, method=lambda m, t: m.embed(t))
  return h.astype(config.compute_dtype)


def _final_norm(config: ModelConfig, params: Mapping, h: jax.Array) -> jax.Array:
  return Decoder(config).apply({"params": params}, h, method=lambda m, x: m.final_norm(x))


def _token_cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
  """a, b [B,T,d] -> per-token cosine [B,T] in float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
  return dot / jnp.maximum(norms, eps)


def run_layers_with_stats(config: ModelConfig, params: Mapping, tokens: jax.Array,
                          positions: jax.Array | None = None, kv_end: jax.Array | None = None,
                          mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs the decoder's layer stack, measuring input/output cosine inside the scan.

  Args:
    config: model config.
    params: unboxed `Decoder` params (layers stacked on axis 0).
    tokens: [B,T] int32. positions / kv_end: [B,T] int32 or None, as for `Decoder`.
    mask: [B,T] bool/float, which tokens count (real tokens, not padding); default all.

  Returns:
    (final-normed hidden [B,T,d], stats) with stats `cos_sum`, `cos_sq_sum`, `cos_min` [L]
    float32 over the masked tokens and `count` (scalar float32, masked tokens).
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  weight = (jnp.ones(tokens.shape, jnp.float32) if mask is None
            else (jnp.asarray(mask) > 0).astype(jnp.float32))
  h = _embed(config, params, tokens)
  cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, config.compute_dtype)
  block = DecoderBlock(config)

  def body(h_in, layer_params):
    h_out, _ = block.apply({"params": layer_params}, h_in, cos, sin, kv_end)
    c = _token_cosine(h_in, h_out)
    stats = {"cos_sum": jnp.sum(c * weight), "cos_sq_sum": jnp.sum(c * c * weight),
             "cos_min": jnp.min(jnp.where(weight > 0, c, jnp.inf))}
    return h_out, stats

  h, stats = jax.lax.scan(body, h, params["layers"], unroll=config.scan_unroll)
  stats["count"] = jnp.sum(weight)
  return _final_norm(config, params, h), stats


def batch_mask(batch: Mapping[str, Any]) -> np.ndarray | None:
  """Real (non-padding) tokens of a packed batch: `segment_ids > 0`, else `weights > 0`."""
  if "segment_ids" in batch:
    return np.asarray(batch["segment_ids"]) > 0
  if "weights" in batch:
    return np.asarray(batch["weights"]) > 0
  return None


@dataclasses.dataclass(frozen=True)
class SaturationReport:
  """Per-layer input/output cosine over the calibration tokens.

  mean_cosine, std_cosine, min_cosine: [L] lists; block_influence = 1 - mean_cosine (ShortGPT).
  """
  mean_cosine: list[float]
  std_cosine: list[float]
  min_cosine: list[float]
  num_tokens: int
  num_batches: int

  @property
  def num_layers(self) -> int:
    return len(self.mean_cosine)

  @property
  def block_influence(self) -> list[float]:
    return [1.0 - c for c in self.mean_cosine]

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "block_influence": self.block_influence,
            "num_layers": self.num_layers}


class SaturationAccumulator:
  """Streams per-batch sums into float64 host totals; `report()` gives means and stds."""

  def __init__(self, num_layers: int):
    self._sum = np.zeros(num_layers, np.float64)
    self._sq = np.zeros(num_layers, np.float64)
    self._min = np.full(num_layers, np.inf)
    self._count = 0.0
    self._batches = 0

  def add(self, stats: Mapping[str, Any]) -> None:
    stats = jax.device_get(stats)
    self._sum += np.asarray(stats["cos_sum"], np.float64)
    self._sq += np.asarray(stats["cos_sq_sum"], np.float64)
    self._min = np.minimum(self._min, np.asarray(stats["cos_min"], np.float64))
    self._count += float(stats["count"])
    self._batches += 1

  def report(self) -> SaturationReport:
    if self._count <= 0:
      raise ValueError("no calibration tokens were seen (all batches empty or masked out)")
    mean = self._sum / self._count
    # max(., 0): E[c²] - E[c]² can dip below 0 by rounding when every token has the same cos.
    std = np.sqrt(np.maximum(self._sq / self._count - mean * mean, 0.0))
    return SaturationReport(mean.tolist(), std.tolist(), self._min.tolist(),
                            int(round(self._count)), self._batches)


def make_stats_fn(config: ModelConfig) -> Callable[..., dict[str, jax.Array]]:
  """A jitted (params, tokens, positions, kv_end, mask) -> per-layer sums (one pass a batch)."""

  @jax.jit
  def stats_fn(params, tokens, positions, kv_end, mask):
    return run_layers_with_stats(config, params, tokens, positions, kv_end, mask)[1]

  return stats_fn


def analyze_saturation(config: ModelConfig, params: Mapping,
                       batches: Iterable[Mapping[str, Any]], *,
                       max_batches: int | None = None) -> SaturationReport:
  """Per-layer mean/std cosine over the real tokens of up to `max_batches` packed batches.

  batches: dicts with `tokens` [B,T] and optionally `positions`, `kv_end`, `segment_ids` /
  `weights` (the packed-row contract of `kat_jax.data.packing`).
  """
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
  stats_fn = make_stats_fn(config)
  acc = SaturationAccumulator(config.num_layers)
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    tokens = jnp.asarray(batch["tokens"])
    mask = batch_mask(batch)
    positions, kv_end = batch.get("positions"), batch.get("kv_end")
    acc.add(stats_fn(params, tokens,
                     None if positions is None else jnp.asarray(positions),
                     None if kv_end is None else jnp.asarray(kv_end),
                     jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask)))
  return acc.report()


def save_report_json(report: SaturationReport, path: str | os.PathLike,
                     extra: Mapping[str, Any] | None = None) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**report.to_dict(), **(extra or {})}, f, indent=2)
    f.write("\n")


def plot_saturation(report: SaturationReport, path: str | os.PathLike, *,
                    selected: Iterable[int] = (), title: str = "Layer saturation") -> None:
  """PNG: mean cosine ± std per layer; selected (duplicated) layers highlighted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  layers = np.arange(report.num_layers)
  mean, std = np.asarray(report.mean_cosine), np.asarray(report.std_cosine)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * report.num_layers + 4), 3.5))
  ax.errorbar(layers, mean, yerr=std, fmt="o-", ms=3, capsize=2, label="mean ± std cos")
  chosen = sorted(set(selected))
  if chosen:
    ax.scatter(chosen, mean[chosen], s=60, facecolors="none", edgecolors="red",
               label="duplicated", zorder=3)
  ax.set_xlabel("layer")
  ax.set_ylabel("cos(layer input, layer output)")
  ax.set_title(f"{title} ({report.num_tokens:,} tokens)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
