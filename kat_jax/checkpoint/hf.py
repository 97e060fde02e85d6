"""Hugging Face Qwen2 checkpoints (config.json + safetensors) <-> kat_jax `ModelConfig` + params.

Name and shape map (docs/spec.md §1.3; torch `Linear.weight` is [out, in], ours [in, ...out]):

  model.embed_tokens.weight [V,d]                    embed/embedding [V,d]
  model.layers.{i}.input_layernorm.weight [d]        layers/input_norm/scale [L,d]
  model.layers.{i}.self_attn.q_proj.weight [H*D,d]   layers/attn/q_kernel [L,d,H,D]
  model.layers.{i}.self_attn.q_proj.bias [H*D]       layers/attn/q_bias [L,H,D]   (k, v alike)
  model.layers.{i}.self_attn.o_proj.weight [d,H*D]   layers/attn/o_kernel [L,H,D,d]
  model.layers.{i}.post_attention_layernorm.weight   layers/post_attn_norm/scale [L,d]
  model.layers.{i}.mlp.{gate,up}_proj.weight [F,d]   layers/mlp/{gate,up}_proj [L,d,F]
  model.layers.{i}.mlp.down_proj.weight [d,F]        layers/mlp/down_proj [L,F,d]
  model.norm.weight [d]                              final_norm/scale [d]
  lm_head.weight [V,d]                               lm_head/kernel [d,V] (absent when tied)

MTP heads (params["mtp"], `kat_jax.model.mtp`), when present, are written to their own file
`mtp.safetensors` as tensors `mtp.<k>.<param path>` in kat_jax layout; the model.safetensors
files stay a plain Qwen2 checkpoint. `load_pretrained(..., load_mtp=True)` returns them
under params["mtp"].

Loading streams one layer at a time into preallocated stacked arrays, so host memory peaks at
about one copy of the weights plus one layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kat_jax.model.config import DTYPES, ModelConfig
from kat_jax.model.mtp import MTP_FILE, mtp_from_flat, mtp_to_flat

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"^model-\d+-of-\d+\.safetensors$")

# Qwen2.5 base models: <|endoftext|> is bos, eos and pad (docs/spec.md §1.2, §1.4).
QWEN25_ENDOFTEXT_ID = 151643

# Fields that change parameter shapes; `config_overrides` may not touch them on load.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias")

_REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads")

# Buffers some older exports carry; they are recomputed, never parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# config.json


def _dtype_name(dtype: Any) -> str:
  """'bfloat16' / jnp.bfloat16 / np.float32 / 'torch.float16' -> a key of `DTYPES`."""
  name = str(dtype).removeprefix("torch.") if isinstance(dtype, str) else np.dtype(dtype).name
  if name not in DTYPES:
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {tuple(DTYPES)}")
  return name


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
  """rope_theta from transformers 5.x `rope_parameters` or 4.x top-level fields."""
  if hf_config.get("rope_scaling"):
    raise NotImplementedError(
        f"rope_scaling {hf_config['rope_scaling']!r} is not implemented (kat_jax uses plain"
        " RoPE); remove it from config.json to load the model at its native context length")
  rope = hf_config.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise NotImplementedError(
        f"rope_parameters of type {rope_type!r} are not implemented (only 'default' RoPE)")
  # 10000.0 is the transformers 4.x Qwen2Config default when the field is absent.
  return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Builds a `ModelConfig` from a Qwen2 config.json dict (transformers 4.x or 5.x layout).

  `param_dtype` follows the checkpoint's `torch_dtype`/`dtype` (float32 when absent).
  Raises ValueError for non-qwen2 models and NotImplementedError for sliding-window attention,
  RoPE scaling and attention dropout, which the kat_jax decoder does not implement.
  """
  model_type = hf_config.get("model_type")
  if model_type != "qwen2":
    raise ValueError(
        f"model_type {model_type!r} is not supported: kat_jax imports only 'qwen2'"
        " (Qwen2 / Qwen2.5) checkpoints")
  if hf_config.get("use_sliding_window", False):
    raise NotImplementedError(
        "use_sliding_window: true is not implemented (kat_jax attention is full causal);"
        " Qwen2.5 checkpoints ship with use_sliding_window: false")
  layer_types = hf_config.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise NotImplementedError(f"only full_attention layers are implemented, got {layer_types}")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"hidden_act {hf_config['hidden_act']!r} is not implemented"
                              " (only silu)")
  if hf_config.get("attention_dropout", 0.0):
    raise NotImplementedError(
        f"attention_dropout {hf_config['attention_dropout']} is not implemented (only 0.0)")
  missing = [k for k in _REQUIRED_HF_FIELDS if k not in hf_config]
  if missing:
    raise ValueError(f"Qwen2 config is missing required field(s) {missing}")
  dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
  num_heads = hf_config["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf_config["vocab_size"],
      hidden_size=hf_config["hidden_size"],
      intermediate_size=hf_config["intermediate_size"],
      num_layers=hf_config["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim"),
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      rope_theta=_rope_theta(hf_config),
      max_position_embeddings=hf_config.get("max_position_embeddings", 32768),
      tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
      qkv_bias=True,  # Qwen2 attention always has q/k/v biases.
      initializer_range=hf_config.get("initializer_range", 0.02),
      param_dtype=_dtype_name(dtype),
  )


def config_to_hf(config: ModelConfig, *, dtype: Any = None) -> dict[str, Any]:
  """A Qwen2 config.json dict that transformers 4.x and 5.x load as `Qwen2ForCausalLM`.

  `dtype` (default `config.param_dtype`) is recorded as `torch_dtype`/`dtype`. Qwen2 has no
  switch for q/k/v biases, so a `qkv_bias=False` model is written with zero biases.
  """
  dtype_name = _dtype_name(dtype if dtype is not None else config.param_dtype)
  hf = {
      "architectures": ["Qwen2ForCausalLM"],
      "model_type": "qwen2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "initializer_range": config.initializer_range,
      "rms_norm_eps": config.rms_norm_eps,
      # 4.x reads rope_theta, 5.x reads rope_parameters; both are written.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": config.num_layers,
      "layer_types": ["full_attention"] * config.num_layers,
      "attention_dropout": 0.0,
      "tie_word_embeddings": config.tie_word_embeddings,
      "use_cache": True,
      "torch_dtype": dtype_name,
      "dtype": dtype_name,
  }
  hf.update(_special_token_ids(config))
  return hf


def _special_token_ids(config: ModelConfig) -> dict[str, int]:
  """Qwen2.5 bos/eos ids, only when the vocabulary has that row (tiny test vocabs do not)."""
  if QWEN25_ENDOFTEXT_ID >= config.vocab_size:
    return {}
  return {"bos_token_id": QWEN25_ENDOFTEXT_ID, "eos_token_id": QWEN25_ENDOFTEXT_ID}


# ---------------------------------------------------------------------------------------------
# The tensor map


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and where it lives in our tree.

  kind: 'linear' (torch [out, in] <-> ours [in, ...] with out split/merged), 'vector' (reshape
  only), 'copy' (same layout).
  """

  hf_name: str
  path: tuple[str, ...]
  kind: str
  ours: tuple[int, ...]  # our shape, without the layer axis
  theirs: tuple[int, ...]  # the HF shape

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return w.T.reshape(self.ours)
    return w.reshape(self.ours)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return np.ascontiguousarray(w.reshape(-1, self.theirs[0]).T)
    return np.ascontiguousarray(w.reshape(self.theirs))


def _layer_tensors(config: ModelConfig, i: int) -> list[_Tensor]:
  d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
  h, k = config.num_heads, config.num_kv_heads
  pre = f"model.layers.{i}."
  specs = [
      _Tensor(pre + "input_layernorm.weight", ("input_norm", "scale"), "vector", (d,), (d,)),
      _Tensor(pre + "post_attention_layernorm.weight", ("post_attn_norm", "scale"), "vector",
              (d,), (d,)),
      _Tensor(pre + "self_attn.o_proj.weight", ("attn", "o_kernel"), "linear", (h, hd, d),
              (d, h * hd)),
      _Tensor(pre + "mlp.gate_proj.weight", ("mlp", "gate_proj"), "linear", (d, f), (f, d)),
      _Tensor(pre + "mlp.up_proj.weight", ("mlp", "up_proj"), "linear", (d, f), (f, d)),
      _Tensor(pre + "mlp.down_proj.weight", ("mlp", "down_proj"), "linear", (f, d), (d, f)),
  ]
  for name, heads in (("q", h), ("k", k), ("v", k)):
    specs.append(_Tensor(pre + f"self_attn.{name}_proj.weight", ("attn", f"{name}_kernel"),
                         "linear", (d, heads, hd), (heads * hd, d)))
    specs.append(_Tensor(pre + f"self_attn.{name}_proj.bias", ("attn", f"{name}_bias"),
                         "vector", (heads, hd), (heads * hd,)))
  return specs


def _global_tensors(config: ModelConfig) -> dict[str, _Tensor]:
  v, d = config.vocab_size, config.hidden_size
  specs = {
      "embed": _Tensor("model.embed_tokens.weight", ("embed", "embedding"), "copy", (v, d),
                       (v, d)),
      "norm": _Tensor("model.norm.weight", ("final_norm", "scale"), "vector", (d,), (d,)),
      "lm_head": _Tensor("lm_head.weight", ("lm_head", "kernel"), "linear", (d, v), (v, d)),
  }
  return specs


def _expected_hf_names(config: ModelConfig) -> set[str]:
  names = {t.hf_name for i in range(config.num_layers) for t in _layer_tensors(config, i)}
  return names | {t.hf_name for t in _global_tensors(config).values()}


# ---------------------------------------------------------------------------------------------
# Reading


class _CheckpointReader:
  """Lazy access to the tensors of one checkpoint directory (single file or sharded)."""

  def __init__(self, path: str):
    self.path = path
    index_path = os.path.join(path, INDEX_FILE)
    single_path = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as fp:
        index = json.load(fp)
      if "weight_map" not in index:
        raise ValueError(f"{index_path} has no 'weight_map'")
      self.weight_map: dict[str, str] = dict(index["weight_map"])
      missing_files = sorted({f for f in self.weight_map.values()
                              if not os.path.exists(os.path.join(path, f))})
      if missing_files:
        raise FileNotFoundError(
            f"shard file(s) {missing_files} listed in {INDEX_FILE} are missing from {path}")
    elif os.path.exists(single_path):
      with safe_open(single_path, framework="numpy") as handle:
        self.weight_map = {name: SINGLE_FILE for name in handle.keys()}
    else:
      raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.weight_map)

  def read(self, name: str) -> np.ndarray:
    file = self.weight_map[name]
    if file not in self._handles:
      self._handles[file] = safe_open(os.path.join(self.path, file), framework="numpy")
    handle = self._handles[file]
    try:
      return _get_numpy(handle, os.path.join(self.path, file), name)
    except Exception as e:  # safetensors raises a bare SafetensorError for a missing key
      if name not in handle.keys():
        raise KeyError(f"tensor {name!r} is listed in {INDEX_FILE} but missing from"
                       f" {file} in {self.path}") from e
      raise


def _get_numpy(handle: Any, file: str, name: str) -> np.ndarray:
  """Reads one tensor as numpy; bf16 comes back as `ml_dtypes.bfloat16`."""
  try:
    return handle.get_tensor(name)
  except TypeError:
    # Older safetensors have no numpy bf16; the flax frame returns a jax array of it.
    with safe_open(file, framework="flax") as flax_handle:
      return np.asarray(flax_handle.get_tensor(name))


def _check_names(reader: _CheckpointReader, config: ModelConfig) -> None:
  expected = _expected_hf_names(config)
  found = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
  lm_head = _global_tensors(config)["lm_head"].hf_name
  optional = {lm_head} if config.tie_word_embeddings else set()
  missing = sorted(expected - optional - found)
  if missing:
    if missing == [lm_head]:
      raise KeyError(f"{lm_head!r} is missing from the checkpoint in {reader.path}, but its"
                     " config.json has tie_word_embeddings: false")
    raise KeyError(f"checkpoint in {reader.path} is missing {len(missing)} tensor(s): "
                   f"{_abbreviate(missing)}")
  unexpected = sorted(found - expected)
  if unexpected:
    raise ValueError(f"checkpoint in {reader.path} has {len(unexpected)} unexpected tensor(s)"
                     f" for a qwen2 model with {config.num_layers} layers: "
                     f"{_abbreviate(unexpected)}")


def _abbreviate(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _read_checked(reader: _CheckpointReader, spec: _Tensor) -> np.ndarray:
  w = reader.read(spec.hf_name)
  if tuple(w.shape) != spec.theirs:
    raise ValueError(f"tensor {spec.hf_name!r} in {reader.path} has shape {tuple(w.shape)},"
                     f" expected {spec.theirs} from config.json")
  return w


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _read_tree(reader: _CheckpointReader, config: ModelConfig, dtype: np.dtype) -> dict:
  """Numpy param tree; stacked layer leaves are filled one layer at a time."""
  tree: dict = {}
  globals_ = _global_tensors(config)

  def store(spec: _Tensor, w: np.ndarray) -> None:
    _set(tree, spec.path, spec.to_ours(w).astype(dtype, copy=False))

  embedding = _read_checked(reader, globals_["embed"])
  store(globals_["embed"], embedding)
  if config.tie_word_embeddings:
    _check_tied_head(reader, globals_["lm_head"], embedding)
  else:
    store(globals_["lm_head"], _read_checked(reader, globals_["lm_head"]))
  del embedding
  store(globals_["norm"], _read_checked(reader, globals_["norm"]))

  stacked = {t.path: np.empty((config.num_layers, *t.ours), dtype)
             for t in _layer_tensors(config, 0)}
  for i in range(config.num_layers):
    for spec in _layer_tensors(config, i):
      stacked[spec.path][i] = spec.to_ours(_read_checked(reader, spec))
  for path, value in stacked.items():
    _set(tree, ("layers", *path), value)
  return tree


def _check_tied_head(reader: _CheckpointReader, spec: _Tensor, embedding: np.ndarray) -> None:
  """A tied checkpoint may carry lm_head.weight, but only as a copy of the embedding."""
  if spec.hf_name not in reader.names():
    return
  head = _read_checked(reader, spec)
  if not np.array_equal(head, embedding):
    raise ValueError(f"config.json in {reader.path} has tie_word_embeddings: true but"
                     f" {spec.hf_name!r} differs from model.embed_tokens.weight")


def _to_device_tree(tree: dict) -> dict:
  """Replaces numpy leaves by jax arrays one at a time so each host copy can be freed early."""
  for key in list(tree):
    value = tree[key]
    tree[key] = _to_device_tree(value) if isinstance(value, dict) else jax.device_put(value)
    del value
  return tree


def read_hf_config(path: str) -> dict[str, Any]:
  """The config.json of a checkpoint directory as a dict."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no {CONFIG_FILE} in {path}")
  with open(config_path) as fp:
    return json.load(fp)


def load_pretrained(path: str | os.PathLike, *, dtype: Any = None,
                    config_overrides: Mapping[str, Any] | None = None,
                    load_mtp: bool = False) -> tuple[ModelConfig, dict]:
  """Loads a Hugging Face Qwen2 checkpoint directory -> (config, unboxed params).

  Args:
    path: directory with config.json and model.safetensors, or
      model.safetensors.index.json plus its shards.
    dtype: dtype of the returned params (e.g. 'float32', jnp.bfloat16). Default: the
      checkpoint's `torch_dtype` (or `param_dtype` in `config_overrides`). The returned
      config's `param_dtype` matches it.
    config_overrides: `ModelConfig` execution fields to set (dtype, remat_policy,
      attention_backend, ...); fields that change parameter shapes are refused.
    load_mtp: also return the MTP heads of `mtp.safetensors` when the directory has one
      (off by default: stages that train or sample the plain decoder ignore them).

  Returns:
    (config, params) with params in the `Decoder` layout (layers stacked on axis 0), plus
    params["mtp"] when MTP heads were loaded.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  config = config_from_hf(read_hf_config(path))
  overrides = dict(config_overrides or {})
  shape_changes = sorted(set(overrides) & set(_SHAPE_FIELDS))
  if shape_changes:
    raise ValueError(f"config_overrides may not change parameter shapes; got {shape_changes}")
  if dtype is not None:
    overrides["param_dtype"] = _dtype_name(dtype)
  config = config.replace(**overrides)

  reader = _CheckpointReader(path)
  _check_names(reader, config)
  tree = _read_tree(reader, config, np.dtype(config.weight_dtype))
  mtp_path = os.path.join(path, MTP_FILE)
  if load_mtp and os.path.exists(mtp_path):
    with safe_open(mtp_path, framework="numpy") as handle:
      flat = {n: _get_numpy(handle, mtp_path, n).astype(config.weight_dtype, copy=False)
              for n in handle.keys()}
    tree["mtp"] = mtp_from_flat(flat, config, where=mtp_path)
  return config, _to_device_tree(tree)


# ---------------------------------------------------------------------------------------------
# Writing


def _parse_size(size: int | str) -> int:
  """'5GB' -> 5e9 bytes (decimal units, as transformers); 'GiB'-style units are binary."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
  if not match:
    raise ValueError(f"cannot parse max_shard_size {size!r}; use bytes or e.g. '5GB', '100KB'")
  number, unit = float(match.group(1)), match.group(2)
  base = 1024 if "I" in unit else 1000
  power = "BKMGT".index(unit[0]) if unit != "B" else 0
  return int(number * base ** power)


def _get(params: Mapping, path: tuple[str, ...]) -> Any:
  node: Any = params
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"params has no {'/'.join(path[:depth + 1])}")
    node = node[key]
  return node


def _check_param_shapes(params: Mapping, config: ModelConfig) -> None:
  specs = [(t.path, t.ours) for t in _global_tensors(config).values()
           if t.path[0] != "lm_head" or not config.tie_word_embeddings]
  specs += [(("layers", *t.path), (config.num_layers, *t.ours))
            for t in _layer_tensors(config, 0)]
  for path, shape in specs:
    leaf = _get(params, path)
    if tuple(leaf.shape) != shape:
      raise ValueError(f"params {'/'.join(path)} has shape {tuple(leaf.shape)}, expected"
                       f" {shape} for this config")


def _host(leaf: Any, dtype: np.dtype) -> np.ndarray:
  return np.asarray(jax.device_get(leaf)).astype(dtype, copy=False)


# (hf_name, nbytes, produce) for every tensor, in the order they are written.
_Planned = tuple[str, int, Callable[[], np.ndarray]]


def _plan_tensors(params: Mapping, config: ModelConfig, dtype: np.dtype) -> Iterator[_Planned]:
  """Yields the tensors to write, each produced lazily (one layer slice at a time)."""

  def nbytes(spec: _Tensor) -> int:
    return int(np.prod(spec.theirs)) * dtype.itemsize

  globals_ = _global_tensors(config)
  for key in ("embed", "norm"):
    spec = globals_[key]
    yield spec.hf_name, nbytes(spec), lambda s=spec: s.to_hf(_host(_get(params, s.path), dtype))
  if not config.tie_word_embeddings:
    spec = globals_["lm_head"]
    yield spec.hf_name, nbytes(spec), lambda s=spec: s.to_hf(_host(_get(params, s.path), dtype))
  for i in range(config.num_layers):
    for spec in _layer_tensors(config, i):
      if spec.path[1].endswith("_bias") and not config.qkv_bias:
        # Qwen2 always has biases: a bias-free model is written with zeros.
        yield spec.hf_name, nbytes(spec), lambda s=spec: np.zeros(s.theirs, dtype)
        continue
      leaf = ("layers", *spec.path)
      yield (spec.hf_name, nbytes(spec),
             lambda s=spec, i=i, leaf=leaf: s.to_hf(_host(_get(params, leaf)[i], dtype)))


def _split_shards(planned: list[_Planned], max_bytes: int) -> list[list[_Planned]]:
  """Greedy in-order packing, as transformers does; a tensor larger than the limit goes alone."""
  shards: list[list[_Planned]] = [[]]
  size = 0
  for item in planned:
    if shards[-1] and size + item[1] > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  return shards


def _remove_stale_weights(path: str, keep: set[str]) -> None:
  """Deletes weight files of an earlier save that this one does not overwrite."""
  for name in os.listdir(path):
    is_weight = name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.match(name)
    if is_weight and name not in keep:
      os.remove(os.path.join(path, name))


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  with open(path, "w") as fp:
    json.dump(value, fp, indent=2, sort_keys=True)
    fp.write("\n")


def save_pretrained(path: str | os.PathLike, config: ModelConfig, params: Mapping, *,
                    max_shard_size: int | str = "5GB", dtype: Any = None) -> None:
  """Writes a Hugging Face Qwen2 checkpoint directory that transformers loads.

  Files: config.json, generation_config.json and either model.safetensors or
  model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json.

  Args:
    path: output directory (created if missing; older weight files in it are removed).
    config: the model's config.
    params: unboxed param tree in the `Decoder` layout (jax or numpy leaves); an "mtp" key
      (MTP heads) is written to mtp.safetensors.
    max_shard_size: bytes per shard, int or '5GB' / '100KB' / '2GiB'.
    dtype: dtype written to disk; default `config.param_dtype`.
  """
  path = os.fspath(path)
  params = nn.meta.unbox(params)
  _check_param_shapes(params, config)
  dtype_name = _dtype_name(dtype if dtype is not None else config.param_dtype)
  np_dtype = np.dtype(DTYPES[dtype_name])
  os.makedirs(path, exist_ok=True)

  _write_json(os.path.join(path, CONFIG_FILE), config_to_hf(config, dtype=dtype_name))
  generation = {"_from_model_config": True, **_special_token_ids(config)}
  if "eos_token_id" in generation:
    generation["pad_token_id"] = generation["eos_token_id"]
  _write_json(os.path.join(path, GENERATION_CONFIG_FILE), generation)

  planned = list(_plan_tensors(params, config, np_dtype))
  shards = _split_shards(planned, _parse_size(max_shard_size))
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  _remove_stale_weights(path, set(names) | ({INDEX_FILE} if len(shards) > 1 else set()))

  weight_map = {}
  for name, shard in zip(names, shards):
    tensors = {hf_name: produce() for hf_name, _, produce in shard}
    # "format": "pt" is what transformers checks before loading a safetensors file.
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({hf_name: name for hf_name in tensors})
    del tensors
  if len(shards) > 1:
    total = sum(item[1] for item in planned)
    _write_json(os.path.join(path, INDEX_FILE),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  mtp_path = os.path.join(path, MTP_FILE)
  if params.get("mtp"):
    save_file({n: _host(x, np_dtype) for n, x in mtp_to_flat(params["mtp"]).items()},
              mtp_path, metadata={"format": "kat_jax_mtp"})
  elif os.path.exists(mtp_path):  # a stale file of an earlier save would be loaded back
    os.remove(mtp_path)
