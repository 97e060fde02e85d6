"""The decoder's forward pass over a preallocated KV cache (prefill chunks and decode steps).

Same math as `kat_jax.model.Decoder` (it reuses `rms_norm`, `rope_cos_sin`, `apply_rope`), laid
out for decoding:

- layer weights are unstacked into one dict per layer (`prepare_params`), so the unrolled
  layer loop reads each weight in place; slicing a stacked `[L, ...]` weight inside the step
  can make XLA copy it, which doubles the bytes a bandwidth-bound decode step moves;
- q/k/v and gate/up kernels are concatenated into one matmul each (fewer, larger kernels);
- weights are output-major (`[N, K]`, the HF layout), the layout the fused decode kernels
  (`kat_jax.kernels.decode`) read as contiguous rows;
- weights are cast to the compute dtype once, not on every step.

`forward_chunk(..., kernels="fused")` runs a one-token step of at most
`kat_jax.kernels.decode.MAX_BATCH` rows through those kernels (five per layer) instead of XLA's
ops; both paths compute the same function (tested against each other).

Cache layout (left-aligned slots shared by the batch). Every row writes its next tokens at the
same slots `[end, end+T)`; a per-row `valid [B, S]` flag says which slots hold real tokens and
`next_pos [B]` is the RoPE position of the row's next token. Query at slot `q` sees key slot
`k` iff `valid[b, k] and k <= q`. Padding (left padding of ragged prompts, slots of rows that
already stopped) is just invalid slots, so RoPE positions and attention equal those of the
unpadded sequence.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from kat_jax.kernels.decode import decode_attention, fused_matvec, fused_path_supported
from kat_jax.kernels.reference import cached_attention
from kat_jax.model.config import ModelConfig
from kat_jax.model.layers import apply_rope, rms_norm, rope_cos_sin
from kat_jax.parallel.mesh import LOGICAL_RULES, logical_to_sharding

CACHE_AXES = ("cache_batch", "cache_length", "kv_heads", "head_dim")

# Tiles of the fused decode step's kernels (keyword arguments of `fused_matvec` and
# `decode_attention`), the fastest measured on an H200 at Qwen2.5-1.5B shapes, batch 1
# (docs/sampling.md); a tile must divide the product's output size (`fused_path_supported`).
# `programs_per_core` runs the product on a persistent grid of that many programs per SM;
# `max_chunk` widens the loads: 512 columns where K = 1536; 1024 for down's K = 8960, whose
# last chunk overlaps the one before (masked).
DECODE_TILES: dict[str, dict[str, Any]] = {
    "qkv": dict(block_n=8, num_warps=4, max_chunk=512),
    "o": dict(block_n=1, num_warps=4, max_chunk=512),
    "gate_up": dict(block_n=2, num_warps=4, programs_per_core=3, max_chunk=512),
    "down": dict(block_n=2, num_warps=4, programs_per_core=3, max_chunk=1024),
    "attention": {},  # decode_attention picks its slot blocks from the cache length
}


def _matvec_options(product: str, n_out: int) -> dict[str, Any]:
  """`fused_matvec` keywords of one of a layer's products (n_out outputs): its tile, a
  persistent grid's program count, and the kernel's name in profiles."""
  options = dict(DECODE_TILES[product], name=f"decode_{product}")
  per_core = options.pop("programs_per_core", None)
  if per_core is not None:
    options["programs"] = min(per_core * gpu_cores(), n_out // options.get("block_n", 8))
  return options


def gpu_cores() -> int:
  """Streaming multiprocessors of the default device; 132 (an H100 / H200) where the device
  does not say (CPU, where the kernels run interpreted)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


@flax.struct.dataclass
class DecodeParams:
  """Decode-ready weights (compute dtype). Build with `prepare_params`.

  embed [V,d]; head [V,d] when tied (the embedding) else [d,V]; final_norm [d];
  layers: one dict per layer of output-major weights: input_norm [d], qkv [(Hq+2Hkv)*D, d],
  qkv_bias [(Hq+2Hkv)*D] (absent without bias), o [d, Hq*D], post_attn_norm [d],
  gate_up [2F, d] (gate rows, then up rows), down [d, F].
  """
  embed: jax.Array
  head: jax.Array
  final_norm: jax.Array
  layers: list[dict[str, jax.Array]]


def prepare_params(params: dict, config: ModelConfig, mesh: Mesh | None = None,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> DecodeParams:
  """Training param tree (stacked layers, unboxed) -> `DecodeParams`. Copies the layer weights
  once; the embedding is cast (no copy where it has the compute dtype) and a tied head is it.

  One jitted program writes the layers' decode layout. With `mesh`, its outputs carry the
  shardings `shard_decode_params` gives them, so no unplaced copy of the layers exists first
  (an RL step rebuilds this copy after every update); the embedding is then placed.
  """
  if isinstance(params, DecodeParams):
    return params if mesh is None else shard_decode_params(params, mesh, rules)
  if "layers" not in params or "embed" not in params:
    raise ValueError("params must be the Decoder's param tree (keys 'embed', 'layers', ...); "
                     f"got keys {sorted(params)}")
  dt = config.compute_dtype
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  embed = params["embed"]["embedding"].astype(dt)
  dparams = DecodeParams(
      embed=embed,
      head=embed if config.tie_word_embeddings else params["lm_head"]["kernel"].astype(dt),
      final_norm=params["final_norm"]["scale"].astype(dt),
      layers=_decode_layers(params["layers"], config=config, mesh=mesh, rules=rules))
  # Placed layers are left where they are; the embedding, head and norm move.
  return dparams if mesh is None else shard_decode_params(dparams, mesh, rules)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "rules"))
def _decode_layers(stacked: dict, *, config: ModelConfig, mesh: Mesh | None,
                   rules: tuple[tuple[str, Any], ...]) -> list[dict[str, jax.Array]]:
  """`prepare_params`'s layer dicts. Every output is built from its layer's slices, so XLA
  writes it without stacked [L, ...] temporaries."""
  dt = config.compute_dtype
  d, hq, hkv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  attn, mlp = stacked["attn"], stacked["mlp"]

  def flat(w, heads):  # [d, H, D] -> [H*D, d]
    return w.reshape(d, heads * hd).T

  layers = []
  for i in range(config.num_layers):
    layer = {
        "input_norm": stacked["input_norm"]["scale"][i].astype(dt),
        "qkv": jnp.concatenate([flat(attn["q_kernel"][i], hq), flat(attn["k_kernel"][i], hkv),
                                flat(attn["v_kernel"][i], hkv)]).astype(dt),
        "o": attn["o_kernel"][i].reshape(hq * hd, d).T.astype(dt),
        "post_attn_norm": stacked["post_attn_norm"]["scale"][i].astype(dt),
        "gate_up": jnp.concatenate([mlp["gate_proj"][i], mlp["up_proj"][i]], -1).T.astype(dt),
        "down": mlp["down_proj"][i].T.astype(dt),
    }
    if config.qkv_bias:
      layer["qkv_bias"] = jnp.concatenate([attn[f"{n}_bias"][i].reshape(-1)
                                           for n in ("q", "k", "v")]).astype(dt)
    layers.append(layer)
  if mesh is not None:
    axes = [_layer_logical_axes(layer) for layer in layers]
    layers = jax.lax.with_sharding_constraint(
        layers, logical_to_sharding(axes, layers, mesh, rules))
  return layers


# Logical axes of the decode weights: tensor parallelism splits heads, mlp rows and the
# vocabulary; the model dimension stays whole (FSDP would all-gather every weight each step).
_LAYER_AXES = {"input_norm": ("norm",), "qkv": ("heads", None), "qkv_bias": ("heads",),
               "o": (None, "heads"), "post_attn_norm": ("norm",), "gate_up": ("mlp", None),
               "down": (None, "mlp")}


def _layer_logical_axes(layer: dict[str, Any]) -> dict[str, PartitionSpec]:
  """One decode layer's weights -> their logical-axis PartitionSpecs."""
  return {k: PartitionSpec(*_LAYER_AXES[k]) for k in layer}


def decode_logical_axes(params: DecodeParams) -> DecodeParams:
  """A DecodeParams-shaped tree of logical-axis PartitionSpecs (map them with the mesh rules)."""
  vocab_rows = params.head.shape == params.embed.shape  # tied: the [V, d] embedding
  return DecodeParams(
      embed=PartitionSpec("vocab", None),
      head=PartitionSpec("vocab", None) if vocab_rows else PartitionSpec(None, "vocab"),
      final_norm=PartitionSpec("norm"),
      layers=[_layer_logical_axes(layer) for layer in params.layers])


def shard_decode_params(params: DecodeParams, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> DecodeParams:
  """Places the decode weights on `mesh` by their logical axes (tensor-parallel: each tensor
  shard holds 1/tensor of every product's weights; a dimension the mesh does not divide stays
  whole). A tied head stays the embedding array (one copy)."""
  shardings = logical_to_sharding(decode_logical_axes(params), params, mesh, rules)
  if params.head is not params.embed:
    return jax.device_put(params, shardings)
  # Tied: place the embedding once and let the head be that array.
  placed = jax.device_put(params.replace(head=None), shardings.replace(head=None))
  return placed.replace(head=placed.embed)


def head_logits(hidden: jax.Array, params: DecodeParams, config: ModelConfig) -> jax.Array:
  """hidden [..., d] -> float32 logits [..., V] (f32 accumulation, as the training loss does)."""
  spec = "...d,vd->...v" if config.tie_word_embeddings else "...d,dv->...v"
  return jnp.einsum(spec, hidden, params.head, preferred_element_type=jnp.float32)


def rope_tables(config: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
  """RoPE cos, sin [length, D] (compute dtype) of positions 0..length-1: row p is what
  `rope_cos_sin` gives position p, so a decode loop builds them once and gathers per step."""
  cos, sin = rope_cos_sin(jnp.arange(length)[None], config.head_dim, config.rope_theta,
                          config.compute_dtype)
  return cos[0, :, 0], sin[0, :, 0]


def _constrain_cache(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, CACHE_AXES)


def layer_qkv(layer: dict[str, jax.Array], h: jax.Array, config: ModelConfig, cos: jax.Array,
              sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A layer's attention inputs: h [B,T,d], RoPE cos/sin broadcastable to [B,T,1,D] ->
  rotated q [B,T,Hq,D], k [B,T,Hkv,D], v [B,T,Hkv,D]."""
  batch, length = h.shape[:2]
  hq, hkv, hd = config.num_heads, config.num_kv_heads, config.head_dim
  x = rms_norm(h, layer["input_norm"], config.rms_norm_eps)
  qkv = jnp.einsum("btd,nd->btn", x, layer["qkv"])
  if "qkv_bias" in layer:
    qkv = qkv + layer["qkv_bias"]
  q, k, v = jnp.split(qkv, [hq * hd, (hq + hkv) * hd], axis=-1)
  q = apply_rope(q.reshape(batch, length, hq, hd), cos, sin)
  k = apply_rope(k.reshape(batch, length, hkv, hd), cos, sin)
  return q, k, v.reshape(batch, length, hkv, hd)


def layer_output(layer: dict[str, jax.Array], h: jax.Array, attn_out: jax.Array,
                 config: ModelConfig) -> jax.Array:
  """The rest of a layer: h [B,T,d] + o(attn_out [B,T,Hq*D]), then + the MLP -> [B,T,d]."""
  h = h + jnp.einsum("btk,dk->btd", attn_out, layer["o"])
  x = rms_norm(h, layer["post_attn_norm"], config.rms_norm_eps)
  gate, up = jnp.split(jnp.einsum("btd,fd->btf", x, layer["gate_up"]), 2, axis=-1)
  return h + jnp.einsum("btf,df->btd", nn.silu(gate) * up, layer["down"])


def forward_chunk(params: DecodeParams, config: ModelConfig, cache: dict[str, Any],
                  tokens: jax.Array, token_valid: jax.Array, end: jax.Array,
                  kernels: str = "xla", rope: tuple[jax.Array, jax.Array] | None = None
                  ) -> tuple[dict[str, Any], jax.Array]:
  """Writes T tokens at slots [end, end+T) of every row and returns the last slot's logits.

  Args:
    params: `DecodeParams`.
    config: the model config.
    cache: {"k": [L x [B,S,Hkv,D]], "v": same, "valid": [B,S] bool, "next_pos": [B] int32}.
    tokens: [B,T] int32 (anything at invalid slots).
    token_valid: [B,T] bool, which of the T slots hold real tokens of the row.
    end: int32 scalar, the first free slot.
    kernels: "xla" (XLA ops), "fused" (the Pallas decode kernels; T must be 1 and the batch
      at most `kat_jax.kernels.decode.MAX_BATCH`), or "fused_interpret" (the same kernels in
      Pallas interpret mode, for CPU tests).
    rope: `rope_tables` covering every position of the chunk (at least the cache length);
      None computes the chunk's tables here.

  Returns:
    (updated cache, float32 logits [B,V] at slot end+T-1). Callers put each row's last real
    token at that slot (left padding inside the chunk).
  """
  dt = config.compute_dtype
  hq, hd = config.num_heads, config.head_dim
  batch, length = tokens.shape
  token_valid = token_valid.astype(bool)
  positions = cache["next_pos"][:, None] + jnp.cumsum(token_valid, axis=1) - 1
  positions = jnp.maximum(positions, 0).astype(jnp.int32)
  valid = jax.lax.dynamic_update_slice(cache["valid"], token_valid, (0, end))
  new_pos = cache["next_pos"] + jnp.sum(token_valid, axis=1, dtype=jnp.int32)

  h = jnp.take(params.embed, tokens, axis=0).astype(dt)
  if kernels in ("fused", "fused_interpret"):
    if length != 1:
      raise ValueError(f"the fused decode kernels take one token per row, got {length}")
    # The attention kernel reads its row of the tables at the position itself.
    if rope is None:
      rope = rope_tables(config, valid.shape[1])
    return _fused_step(params, config, cache, h[:, 0], rope, positions[:, 0], valid,
                       new_pos, end, interpret=kernels == "fused_interpret")
  if kernels != "xla":
    raise ValueError(f"kernels must be 'xla', 'fused' or 'fused_interpret', got {kernels!r}")
  if rope is None:
    cos, sin = rope_cos_sin(positions, hd, config.rope_theta, dt)
  else:
    cos, sin = (jnp.take(table, positions, axis=0)[:, :, None] for table in rope)
  slots = jnp.arange(valid.shape[1])
  query_slots = end + jnp.arange(length)
  mask = valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
  new_k, new_v = [], []
  for layer, k_cache, v_cache in zip(params.layers, cache["k"], cache["v"]):
    q, k, v = layer_qkv(layer, h, config, cos, sin)
    k_cache = _constrain_cache(jax.lax.dynamic_update_slice(
        k_cache, k.astype(k_cache.dtype), (0, end, 0, 0)))
    v_cache = _constrain_cache(jax.lax.dynamic_update_slice(
        v_cache, v.astype(v_cache.dtype), (0, end, 0, 0)))
    new_k.append(k_cache)
    new_v.append(v_cache)
    out = cached_attention(q, k_cache, v_cache, mask)
    h = layer_output(layer, h, out.reshape(batch, length, hq * hd), config)
  last = rms_norm(h[:, -1], params.final_norm, config.rms_norm_eps)
  new_cache = {"k": new_k, "v": new_v, "valid": valid, "next_pos": new_pos}
  return new_cache, head_logits(last, params, config)


def _fused_step(params: DecodeParams, config: ModelConfig, cache: dict[str, Any], h: jax.Array,
                rope: tuple[jax.Array, jax.Array], positions: jax.Array, valid: jax.Array,
                new_pos: jax.Array, end: jax.Array, *, interpret: bool
                ) -> tuple[dict[str, Any], jax.Array]:
  """One token per row through the fused kernels: h [B,d], rope tables [P,D] (`rope_tables`),
  positions [B] (each row's table row), valid [B,S]."""
  eps = config.rms_norm_eps
  new_k, new_v = [], []
  for layer, k_cache, v_cache in zip(params.layers, cache["k"], cache["v"]):
    qkv = fused_matvec(h, layer["qkv"], norm_scale=layer["input_norm"], eps=eps,
                       bias=layer.get("qkv_bias"), interpret=interpret,
                       **_matvec_options("qkv", layer["qkv"].shape[0]))
    out, k_cache, v_cache = decode_attention(
        qkv, *rope, positions, k_cache, v_cache, valid, end, num_q_heads=config.num_heads,
        interpret=interpret, **DECODE_TILES["attention"])
    new_k.append(k_cache)
    new_v.append(v_cache)
    h = fused_matvec(out, layer["o"], residual=h, interpret=interpret,
                     **_matvec_options("o", h.shape[-1]))
    act = fused_matvec(h, layer["gate_up"], norm_scale=layer["post_attn_norm"], eps=eps,
                       swiglu=True, interpret=interpret,
                       **_matvec_options("gate_up", layer["gate_up"].shape[0] // 2))
    h = fused_matvec(act, layer["down"], residual=h, interpret=interpret,
                     **_matvec_options("down", h.shape[-1]))
  last = rms_norm(h, params.final_norm, eps)
  new_cache = {"k": new_k, "v": new_v, "valid": valid, "next_pos": new_pos}
  return new_cache, head_logits(last, params, config)


def fused_kernels_fit(config: ModelConfig, batch: int) -> bool:
  """Whether a one-token step of `batch` rows of this model can use the fused kernels."""
  block_n = max(tile.get("block_n", 1) for tile in DECODE_TILES.values())
  return fused_path_supported(batch, config.hidden_size, config.intermediate_size,
                              config.num_heads, config.num_kv_heads, config.head_dim, block_n)
