"""Depth up-scaling as a pure map over the stacked `layers` axis.

    new_layers[j] = old_layers[source[j]]          (every leaf under params["layers"])
    identity init: o_kernel[j] = down_proj[j] = 0  for the inserted slots j

Selection (which layers to duplicate): the k most saturated layers (highest input/output cosine,
Yi arXiv 2403.04652 / KAT-V1 report §2), the most saturated contiguous window of k layers, k
layers spread uniformly (LLaMA-Pro arXiv 2401.02415), or an explicit list.

Placement: `interleave` puts each copy right after its source (LLaMA-Pro; KAT does not say);
`block` repeats one contiguous range once, right after itself (Yi-9B duplicated layers 12..27
of 32; SOLAR's `[0..23] + [8..31]` is the same idea with the seam layers dropped).

Init: `copy` keeps the copied weights (SOLAR, Yi, KAT "duplication"); `identity` zeroes the
inserted blocks' `o_kernel` and `down_proj` (LLaMA-Pro). With pre-norm residual blocks and no
o/down biases, a zeroed block adds exactly 0 to the residual stream, so the up-scaled model
computes the same function; its gradients are not zero, unlike zeroing the norm scales.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model.config import ModelConfig

PLACEMENTS = ("interleave", "block")
INITS = ("copy", "identity")
SELECTIONS = ("top_k", "window", "uniform", "explicit")
# Output projections of a block; zero both and the block is the identity map.
_ZEROED_IN_IDENTITY = (("attn", "o_kernel"), ("mlp", "down_proj"))


@dataclasses.dataclass(frozen=True)
class LayerMap:
  """new layer j is a copy of old layer `source[j]`; `inserted[j]` marks the added copies."""

  source: tuple[int, ...]
  inserted: tuple[bool, ...]
  old_num_layers: int

  def __post_init__(self):
    if len(self.source) != len(self.inserted):
      raise ValueError(f"source ({len(self.source)}) and inserted ({len(self.inserted)})"
                       " must have the same length")
    bad = [s for s in self.source if not 0 <= s < self.old_num_layers]
    if bad:
      raise ValueError(f"source layer(s) {bad} out of range [0, {self.old_num_layers})")

  @property
  def new_num_layers(self) -> int:
    return len(self.source)

  @property
  def duplicated(self) -> list[int]:
    """Old layers that got a copy, ascending."""
    return sorted({s for s, ins in zip(self.source, self.inserted) if ins})

  def to_dict(self) -> dict[str, Any]:
    return {
        "old_num_layers": self.old_num_layers,
        "new_num_layers": self.new_num_layers,
        "duplicated": self.duplicated,
        "layers": [{"new_index": j, "source_index": s, "inserted": ins}
                   for j, (s, ins) in enumerate(zip(self.source, self.inserted))],
    }

  def save_json(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({**self.to_dict(), **(extra or {})}, f, indent=2)
      f.write("\n")


# ---------------------------------------------------------------------------------------------
# Selection


def _check_k(k: int, available: int, what: str) -> None:
  if k < 1:
    raise ValueError(f"number of layers to duplicate must be >= 1, got {k}")
  if k > available:
    raise ValueError(f"cannot duplicate k={k} layers: only {available} {what}")


def _candidates(num_layers: int, exclude_first: int, exclude_last: int) -> range:
  if exclude_first < 0 or exclude_last < 0:
    raise ValueError(f"exclude_first/exclude_last must be >= 0, got {exclude_first},"
                     f" {exclude_last}")
  return range(exclude_first, num_layers - exclude_last)


def select_top_k(mean_cosine: Sequence[float], k: int, *, exclude_first: int = 0,
                 exclude_last: int = 0) -> list[int]:
  """The k layers with the highest mean cosine (ties: lower index), ascending.

  exclude_first/exclude_last: never pick the first/last few layers (they change the stream most
  and sit next to the embedding / LM head).
  """
  candidates = _candidates(len(mean_cosine), exclude_first, exclude_last)
  _check_k(k, len(candidates), f"candidate layers of {len(mean_cosine)} after excluding "
           f"{exclude_first} first and {exclude_last} last")
  ranked = sorted(candidates, key=lambda i: (-mean_cosine[i], i))
  return sorted(ranked[:k])


def select_window(mean_cosine: Sequence[float], k: int, *, exclude_first: int = 0,
                  exclude_last: int = 0) -> list[int]:
  """The contiguous run of k layers with the highest summed cosine (for `block` placement)."""
  candidates = _candidates(len(mean_cosine), exclude_first, exclude_last)
  _check_k(k, len(candidates), f"candidate layers of {len(mean_cosine)} after excluding "
           f"{exclude_first} first and {exclude_last} last")
  starts = range(candidates.start, candidates.stop - k + 1)
  best = max(starts, key=lambda s: (sum(mean_cosine[s:s + k]), -s))
  return list(range(best, best + k))


def select_uniform(num_layers: int, k: int) -> list[int]:
  """LLaMA-Pro spacing: one copy after every `num_layers / k` layers (after the last of each).

  32 layers, k=8 -> [3, 7, ..., 31]. Needs k to divide num_layers, as LLaMA-Pro's script does.
  """
  _check_k(k, num_layers, "layers in the model")
  if num_layers % k:
    raise ValueError(f"uniform selection needs k={k} to divide num_layers={num_layers}")
  split = num_layers // k
  return [(j + 1) * split - 1 for j in range(k)]


def check_explicit(layers: Iterable[int], num_layers: int) -> list[int]:
  """Validates an explicit layer list: in range, no repeats. Returns it ascending."""
  layers = [int(i) for i in layers]
  if not layers:
    raise ValueError("explicit layer list is empty")
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"layer index {bad} out of range [0, {num_layers})")
  if len(set(layers)) != len(layers):
    raise ValueError(f"explicit layer list has repeats: {layers}")
  return sorted(layers)


def select_layers(selection: str, num_layers: int, k: int, *,
                  mean_cosine: Sequence[float] | None = None, layers: Iterable[int] = (),
                  exclude_first: int = 0, exclude_last: int = 0) -> list[int]:
  """Dispatches on `selection` in SELECTIONS; `mean_cosine` [L] is needed by top_k/window."""
  if selection not in SELECTIONS:
    raise ValueError(f"unknown layer selection {selection!r}; choose one of {SELECTIONS}")
  if selection == "explicit":
    chosen = check_explicit(layers, num_layers)
    if k and len(chosen) != k:
      raise ValueError(f"explicit list has {len(chosen)} layers but k={k}")
    return chosen
  if selection == "uniform":
    return select_uniform(num_layers, k)
  if mean_cosine is None:
    raise ValueError(f"selection {selection!r} needs the saturation analysis (mean_cosine)")
  if len(mean_cosine) != num_layers:
    raise ValueError(f"mean_cosine has {len(mean_cosine)} entries for {num_layers} layers")
  select = select_top_k if selection == "top_k" else select_window
  return select(mean_cosine, k, exclude_first=exclude_first, exclude_last=exclude_last)


# ---------------------------------------------------------------------------------------------
# Placement


def make_layer_map(num_layers: int, duplicated: Iterable[int], placement: str) -> LayerMap:
  """Layer map of an up-scaling that duplicates `duplicated` once each.

  interleave: [.., i, i', i+1, ..] for every duplicated i.
  block: `duplicated` must be one contiguous range a..b; new order [0..b] + [a..b]' + [b+1..].
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
  chosen = check_explicit(duplicated, num_layers)
  if placement == "interleave":
    source, inserted = [], []
    for i in range(num_layers):
      source.append(i)
      inserted.append(False)
      if i in chosen:
        source.append(i)
        inserted.append(True)
    return LayerMap(tuple(source), tuple(inserted), num_layers)
  first, last = chosen[0], chosen[-1]
  if chosen != list(range(first, last + 1)):
    raise ValueError(f"block placement needs one contiguous range of layers, got {chosen};"
                     " use selection 'window' or placement 'interleave'")
  source = list(range(last + 1)) + chosen + list(range(last + 1, num_layers))
  inserted = [False] * (last + 1) + [True] * len(chosen) + [False] * (num_layers - last - 1)
  return LayerMap(tuple(source), tuple(inserted), num_layers)


# ---------------------------------------------------------------------------------------------
# The parameter map


def upscale_config(config: ModelConfig, layer_map: LayerMap) -> ModelConfig:
  """`config` with `num_layers` from the map (a fully unrolled scan stays fully unrolled)."""
  if layer_map.old_num_layers != config.num_layers:
    raise ValueError(f"layer map is for {layer_map.old_num_layers} layers, config has"
                     f" {config.num_layers}")
  unroll = config.scan_unroll
  if unroll == config.num_layers:
    unroll = layer_map.new_num_layers
  return config.replace(num_layers=layer_map.new_num_layers, scan_unroll=unroll)


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def upscale_params(params: Mapping, layer_map: LayerMap, init: str = "copy") -> dict:
  """New param tree: every `layers` leaf gathered along axis 0 by `layer_map.source`.

  Non-layer params (embedding, final norm, LM head) are shared unchanged. Pure and shape-only
  friendly: works under `jax.jit` and `jax.eval_shape`.
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
  if "layers" not in params:
    raise ValueError(f"params has no 'layers' subtree; top-level keys {sorted(params)}")
  source = jnp.asarray(layer_map.source, jnp.int32)
  keep = jnp.asarray([not ins for ins in layer_map.inserted])

  def expand(path, leaf):
    if leaf.shape[0] != layer_map.old_num_layers:
      raise ValueError(f"layers/{'/'.join(_path_names(path))} has leading size {leaf.shape[0]},"
                       f" layer map expects {layer_map.old_num_layers} layers")
    new = jnp.take(leaf, source, axis=0)
    if init == "identity" and _path_names(path)[-2:] in _ZEROED_IN_IDENTITY:
      mask = keep.reshape((-1,) + (1,) * (leaf.ndim - 1))
      new = jnp.where(mask, new, jnp.zeros((), new.dtype))
    return new

  out = dict(params)
  out["layers"] = jax.tree_util.tree_map_with_path(expand, params["layers"])
  return out


def upscale(config: ModelConfig, params: Mapping, layer_map: LayerMap, init: str = "copy"
            ) -> tuple[ModelConfig, dict]:
  """(new config, new params) in one call."""
  return upscale_config(config, layer_map), upscale_params(params, layer_map, init)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
