"""The decoder's forward pass over a paged KV cache (device side of `kat_jax.sampling.engine`).

Cache: per layer `k`, `v` pages `[Hkv, num_pages, page_size, D]` (the layout of JAX's TPU
paged-attention op; logical axes `PAGE_AXES`, kv heads over the tensor axis on a mesh). A row's
token t lives in page `page_table[row, t // page_size]`, slot `t % page_size` (see
`kat_jax.sampling.pages`). Writes of padded or inactive rows go to the scratch page 0.

Same layer math as `forward.forward_chunk` (its `layer_qkv` / `layer_output`, RoPE tables and
float32 head), so the engine's tokens, log-probs and entropies equal the static `Sampler`'s. Decode
attention goes through `attend`, one dispatch point for the paged decode-attention kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kat_jax.kernels.paged_attention import (paged_decode_attention,
                                             paged_decode_attention_reference)
from kat_jax.kernels.reference import cached_attention
from kat_jax.model.config import ModelConfig
from kat_jax.model.layers import rms_norm
from kat_jax.sampling.forward import (DecodeParams, head_logits, layer_output, layer_qkv,
                                     rope_tables)
from kat_jax.sampling.logits import SamplingParams, sample_with_stats
from kat_jax.sampling.pages import SCRATCH_PAGE

PAGE_AXES = ("kv_heads", None, None, "head_dim")
RECORDS = ("token", "logprob", "entropy", "mask")  # a decode call's per-step record


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
           lengths: jax.Array, backend: str = "auto",
           tiling_batch: int | None = None) -> jax.Array:
  """The engine's one decode-attention dispatch: `paged_decode_attention` (shapes and
  tiling_batch there); backend "reference" forces its plain-JAX reference."""
  if backend == "reference":
    return paged_decode_attention_reference(q, k_pages, v_pages, page_table, lengths)
  return paged_decode_attention(q, k_pages, v_pages, page_table, lengths, backend=backend,
                                tiling_batch=tiling_batch)


def init_pages(config: ModelConfig, num_pages: int, page_size: int) -> dict[str, list[jax.Array]]:
  """An all-zero page pool: {"k"/"v": [L x [Hkv, num_pages, page_size, D]]} (compute dtype).

  Written by one jitted program under `PAGE_AXES`, so inside a mesh's sharding context each
  device only ever holds its kv heads' share of the pool.
  """
  shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)

  def make():
    zeros = [_constrain(jnp.zeros(shape, config.compute_dtype))
             for _ in range(2 * config.num_layers)]
    return {"k": zeros[:config.num_layers], "v": zeros[config.num_layers:]}

  return jax.jit(make)()


def _constrain(pages: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(pages, PAGE_AXES)


def _write(pages: jax.Array, values: jax.Array, page: jax.Array, slot: jax.Array) -> jax.Array:
  """pages [Hkv,P,ps,D] <- values [N,Hkv,D] at (page[n], slot[n])."""
  return _constrain(pages.at[:, page, slot].set(jnp.swapaxes(values, 0, 1).astype(pages.dtype)))


def prefill_chunk(params: DecodeParams, cache: dict[str, list[jax.Array]], tokens: jax.Array,
                  start: jax.Array, num_valid: jax.Array, page_table: jax.Array, *,
                  config: ModelConfig) -> tuple[dict[str, list[jax.Array]], jax.Array]:
  """Writes one row's tokens [C] at positions [start, start+num_valid) and returns the float32
  logits [V] after its last valid token. page_table [M] must cover those positions; tokens past
  num_valid are padding (their keys go to the scratch page, their outputs are unused)."""
  size = cache["k"][0].shape[2]
  length = tokens.shape[0]
  index = jnp.arange(length)
  positions = start + index
  valid = index < num_valid
  page = jnp.where(valid, page_table[jnp.minimum(positions // size, page_table.shape[0] - 1)],
                   SCRATCH_PAGE)
  slot = positions % size
  cos, sin = rope_tables(config, page_table.shape[0] * size)
  # Padding positions may run past the tables: clipped (their outputs are never read).
  cos, sin = (jnp.take(t, positions, axis=0, mode="clip")[None, :, None] for t in (cos, sin))
  span = page_table.shape[0] * size
  # Query i sees keys 0..start+i; keys past the chunk's last valid token are zeroed (the
  # scratch page and stale slots may hold anything).
  live = jnp.arange(span) < start + num_valid
  mask = (jnp.arange(span)[None, :] <= positions[:, None])[None]
  h = jnp.take(params.embed, tokens, axis=0)[None].astype(config.compute_dtype)
  new_k, new_v = [], []
  for layer, k_pages, v_pages in zip(params.layers, cache["k"], cache["v"]):
    q, k, v = layer_qkv(layer, h, config, cos, sin)
    k_pages = _write(k_pages, k[0], page, slot)
    v_pages = _write(v_pages, v[0], page, slot)
    new_k.append(k_pages)
    new_v.append(v_pages)
    keys, values = (jnp.where(live[None, :, None, None], jnp.moveaxis(
        p[:, page_table], 0, -2).reshape(1, span, *p.shape[::3]), 0) for p in (k_pages, v_pages))
    out = cached_attention(q, keys, values, mask)
    h = layer_output(layer, h, out.reshape(1, length, -1), config)
  last = rms_norm(jnp.take(h[0], num_valid - 1, axis=0), params.final_norm, config.rms_norm_eps)
  return {"k": new_k, "v": new_v}, head_logits(last, params, config)


def split_attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                 lengths: jax.Array, long_rows: jax.Array, short_pages: int,
                 backend: str = "auto", tiling_batch: int | None = None) -> jax.Array:
  """`attend` in two calls: every row over the first `short_pages` table columns, then the
  rows `long_rows` [N] (index B = none) over the whole table, replacing theirs.

  For a backend whose cost grows with the table width (the XLA one gathers B x M pages), a
  long-tailed batch then reads its few long rows' pages, not every row at their width. The
  caller puts every row longer than `short_pages` pages in `long_rows`. tiling_batch: as
  `attend`'s, for the call over every row (the long rows' call has N rows at any width).
  """
  size = k_pages.shape[2]
  if short_pages >= page_table.shape[1]:
    return attend(q, k_pages, v_pages, page_table, lengths, backend, tiling_batch)
  out = attend(q, k_pages, v_pages, page_table[:, :short_pages],
               jnp.minimum(lengths, short_pages * size), backend, tiling_batch)
  picked = jnp.take(lengths, long_rows, axis=0, mode="fill", fill_value=0)
  long_out = attend(jnp.take(q, long_rows, axis=0, mode="clip"), k_pages, v_pages,
                    jnp.take(page_table, long_rows, axis=0, mode="clip"), picked, backend)
  return out.at[long_rows].set(long_out, mode="drop")


def decode_step(params: DecodeParams, cache: dict[str, list[jax.Array]], tokens: jax.Array,
                positions: jax.Array, active: jax.Array, page_table: jax.Array,
                rope: tuple[jax.Array, jax.Array], *, config: ModelConfig,
                attention: str = "auto", long_rows: jax.Array | None = None,
                short_pages: int = 0, tiling_batch: int | None = None
                ) -> tuple[dict[str, list[jax.Array]], jax.Array]:
  """Feeds one token per row, each at its own position: tokens, positions [B] int32, active [B]
  bool (inactive rows write the scratch page and attend to nothing), page_table [B, M], rope
  tables covering M*page_size positions -> (cache, float32 logits [B, V]). With `long_rows`,
  attention is `split_attend` (rows outside them must fit `short_pages` pages); tiling_batch
  as `attend`'s."""
  size = cache["k"][0].shape[2]
  rows = jnp.arange(tokens.shape[0])
  page = jnp.where(active, page_table[rows, positions // size], SCRATCH_PAGE)
  slot = positions % size
  lengths = jnp.where(active, positions + 1, 0)
  cos, sin = (jnp.take(t, positions, axis=0)[:, None, None] for t in rope)
  h = jnp.take(params.embed, tokens, axis=0)[:, None].astype(config.compute_dtype)
  new_k, new_v = [], []
  for layer, k_pages, v_pages in zip(params.layers, cache["k"], cache["v"]):
    q, k, v = layer_qkv(layer, h, config, cos, sin)
    k_pages = _write(k_pages, k[:, 0], page, slot)
    v_pages = _write(v_pages, v[:, 0], page, slot)
    new_k.append(k_pages)
    new_v.append(v_pages)
    if long_rows is None:
      out = attend(q[:, 0], k_pages, v_pages, page_table, lengths, attention, tiling_batch)
    else:
      out = split_attend(q[:, 0], k_pages, v_pages, page_table, lengths, long_rows,
                         short_pages, attention, tiling_batch)
    h = layer_output(layer, h, out.reshape(out.shape[0], 1, -1), config)
  last = rms_norm(h[:, 0], params.final_norm, config.rms_norm_eps)
  return {"k": new_k, "v": new_v}, head_logits(last, params, config)


def _sample_rows(logits: jax.Array, keys: jax.Array, counts: jax.Array, choice: jax.Array,
                 samplings: tuple[SamplingParams, ...]
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each row's token under its own SamplingParams (`samplings[choice[row]]`) and its own key
  stream (`fold_in(key, tokens generated so far)`, so a request's draws do not depend on its
  slot or its neighbours) -> (tokens, log-probs, entropies) [B]."""
  picked = None
  for index, sampling in enumerate(samplings):
    if sampling.greedy:
      out = sample_with_stats(logits, None, sampling)
    else:
      def one(row, key, count, sampling=sampling):
        key = jax.random.fold_in(jax.random.wrap_key_data(key), count)
        token, logprob, entropy = sample_with_stats(row[None], key, sampling)
        return token[0], logprob[0], entropy[0]
      out = jax.vmap(one)(logits, keys, counts)
    picked = out if picked is None else tuple(
        jnp.where(choice == index, new, old) for new, old in zip(out, picked))
  return picked


def decode_loop(params: DecodeParams, cache: dict[str, list[jax.Array]], logits: jax.Array,
                page_table: jax.Array, positions: jax.Array, budget: jax.Array,
                counts: jax.Array, stop_table: jax.Array, choice: jax.Array, keys: jax.Array,
                long_rows: jax.Array, *, config: ModelConfig,
                samplings: tuple[SamplingParams, ...], steps: int, pad_id: int,
                short_pages: int, attention: str = "auto"
                ) -> tuple[dict[str, list[jax.Array]], jax.Array, jax.Array]:
  """Up to `steps` decode steps of slots [0, W) in one program: sample -> record -> feed.

  Args (S slots, the first W of them run; W < S: a compacted call):
    logits [S,V] float32 (each slot's next-token logits; rows past W pass through);
    page_table [W,M] with pages reserved for `min(steps, budget)` more tokens; positions [W]
    (tokens in the cache); budget [W] tokens each slot may still generate (0: an empty slot);
    counts [W] tokens it generated so far (its key stream's position); stop_table [W,K] stop
    ids, -1 padded; choice [W] index into `samplings`; keys [W,2] uint32 key data; long_rows
    [N] the slots that may need more than `short_pages` pages this call (`split_attend`;
    W = none).

  Returns:
    (cache, logits [S,V], records [W, steps, 4] float32 of RECORDS). A slot stops at a stop
    id (the stop token is fed, as the static sampler does) or when its budget runs out; the
    loop ends early when every slot has stopped. A compacted call tiles attention as the
    S-row call does (`attend`'s tiling_batch), so each slot's rows are the same.
  """
  slots, width = logits.shape[0], positions.shape[0]
  loop = functools.partial(_loop, params, config=config, samplings=samplings, steps=steps,
                           pad_id=pad_id, short_pages=short_pages, attention=attention)
  if width == slots:
    return loop(cache, logits, page_table, positions, budget, counts, stop_table, choice, keys,
                long_rows)
  cache, head, records = loop(cache, logits[:width], page_table, positions, budget, counts,
                              stop_table, choice, keys, long_rows, tiling_batch=slots)
  return cache, logits.at[:width].set(head), records


def _loop(params, cache, logits, page_table, positions, budget, counts, stop_table, choice, keys,
          long_rows, *, config, samplings, steps, pad_id, short_pages, attention,
          tiling_batch=None):
  """`decode_loop` over every row it is given (W = S); tiling_batch as `attend`'s."""
  rope = rope_tables(config, page_table.shape[1] * cache["k"][0].shape[2])
  init = dict(step=jnp.int32(0), cache=cache, logits=logits, positions=positions, budget=budget,
              counts=counts, records=jnp.zeros((logits.shape[0], steps, len(RECORDS)),
                                                jnp.float32))

  def body(c):
    active = c["budget"] > 0
    token, logprob, entropy = _sample_rows(c["logits"], keys, c["counts"], choice, samplings)
    token = jnp.where(active, token, pad_id)
    stopped = active & jnp.any(token[:, None] == stop_table, axis=-1)
    new_cache, new_logits = decode_step(params, config=config, cache=c["cache"], tokens=token,
                                        positions=c["positions"], active=active,
                                        page_table=page_table, rope=rope, attention=attention,
                                        long_rows=long_rows, short_pages=short_pages,
                                        tiling_batch=tiling_batch)
    step = active.astype(jnp.int32)
    record = jnp.stack([token.astype(jnp.float32), jnp.where(active, logprob, 0.0),
                        jnp.where(active, entropy, 0.0), active.astype(jnp.float32)], axis=-1)
    return dict(step=c["step"] + 1, cache=new_cache,
                logits=jnp.where(active[:, None], new_logits, c["logits"]),
                positions=c["positions"] + step,
                budget=jnp.where(stopped, 0, c["budget"] - step), counts=c["counts"] + step,
                records=jax.lax.dynamic_update_slice(c["records"], record[:, None],
                                                     (0, c["step"], 0)))

  def cond(c):
    return (c["step"] < steps) & jnp.any(c["budget"] > 0)

  out = jax.lax.while_loop(cond, body, init)
  return out["cache"], out["logits"], out["records"]


def copy_pages(cache: dict[str, list[jax.Array]], source: jax.Array, dest: jax.Array
               ) -> dict[str, list[jax.Array]]:
  """Copies pages source[i] -> dest[i] in every layer (copy-on-write; scratch-to-scratch pads)."""
  return jax.tree.map(lambda p: _constrain(p.at[:, dest].set(p[:, source])), cache)


def set_row(logits: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
  """logits [S,V] with row `index` replaced by `row` [V]."""
  return logits.at[index].set(row)


def move_rows(logits: jax.Array, source: jax.Array, dest: jax.Array) -> jax.Array:
  """logits [S,V] with row dest[i] <- row source[i] (every row read before any is written);
  source, dest [N] int32, dest S = no move."""
  return logits.at[dest].set(jnp.take(logits, source, axis=0, mode="clip"), mode="drop")


@functools.lru_cache(maxsize=16)
def jitted(config: ModelConfig, pad_id: int, attention: str) -> dict[str, Any]:
  """The engine's device programs for one model config, jitted once (cache buffers
  donated)."""
  return {
      "prefill": jax.jit(functools.partial(prefill_chunk, config=config), donate_argnums=(1,)),
      "decode": jax.jit(functools.partial(decode_loop, config=config, pad_id=pad_id,
                                          attention=attention),
                        static_argnames=("samplings", "steps", "short_pages"),
                        donate_argnums=(1, 2)),
      "copy": jax.jit(copy_pages, donate_argnums=(0,)),
      "set_row": jax.jit(set_row, donate_argnums=(0,)),
      "move_rows": jax.jit(move_rows, donate_argnums=(0,)),
  }
