"""Batched autoregressive generation over a preallocated KV cache.

    sampler = Sampler(config, pad_id=tokenizer.pad_id)
    dparams = prepare_params(params, config)                  # once per weight update
    state = sampler.prefill(dparams, prompts, max_length=1024)  # ragged prompts
    state = fork(state, 8)                                     # G samples per prompt
    result, state = sampler.decode(dparams, state, rng, max_new_tokens=256,
                                   sampling=SamplingParams(1.0), stop_ids=tokenizer.stop_ids)
    state = sampler.extend(dparams, state, tool_outputs)       # multi-turn: continue the cache

Padding: every row writes at the same cache slots; ragged prompts/continuations are left-padded
inside each extension, so each row's last token sits in the last slot and one logits row serves
all. Padded slots are marked invalid and RoPE positions count real tokens only (see
`forward.py`), so every row sees exactly its unpadded sequence.

Decoding is one jitted `lax.while_loop` that samples, records log-prob and entropy, then feeds
the token; it stops when every row has emitted a stop token or after `max_new_tokens`. Every
generated token (the stop token included) is in the cache afterwards, so `extend` continues
from it. `decode` always reserves `max_new_tokens` slots: slots of rows that stopped early
stay invalid.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from kat_jax.kernels.decode import MAX_BATCH
from kat_jax.model.config import ModelConfig
from kat_jax.sampling.forward import (CACHE_AXES, DecodeParams, forward_chunk, fused_kernels_fit,
                                     rope_tables)
from kat_jax.sampling.logits import SamplingParams, sample_with_stats


@flax.struct.dataclass
class DecodeState:
  """A batch of sequences in a KV cache, ready to sample their next token.

  cache: {"k"/"v": [L x [B,S,Hkv,D]], "valid": [B,S] bool, "next_pos": [B] int32};
  logits: [B,V] float32, the next-token logits of each row; end: first free slot (host int).
  """
  cache: dict[str, Any]
  logits: jax.Array
  end: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def batch_size(self) -> int:
    return int(self.logits.shape[0])

  @property
  def max_length(self) -> int:
    return int(self.cache["valid"].shape[1])

  @property
  def lengths(self) -> jax.Array:
    """[B] int32 real tokens per row (= the next RoPE position)."""
    return self.cache["next_pos"]


@flax.struct.dataclass
class GenerationResult:
  """tokens/logprobs/entropies/mask [B,N]; stopped [B] bool (ended by a stop token).

  mask marks generated tokens (the stop token included); after it, tokens hold `pad_id` and
  log-probs/entropies 0. Log-probs and entropies are of the model's untempered distribution
  (of the tempered one with `SamplingParams.tempered_stats`).
  """
  tokens: jax.Array
  logprobs: jax.Array
  entropies: jax.Array
  mask: jax.Array
  stopped: jax.Array

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray(self.mask).sum(axis=1)

  def token_lists(self) -> list[list[int]]:
    """Per-row generated ids, trimmed at the mask (stop token kept)."""
    tokens, lengths = np.asarray(self.tokens), self.lengths
    return [tokens[i, :n].tolist() for i, n in enumerate(lengths)]


def fork(state: DecodeState, num_samples: int) -> DecodeState:
  """Repeats every row `num_samples` times (row i -> rows i*G .. i*G+G-1) after one prefill."""
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if num_samples == 1:
    return state
  return jax.tree.map(lambda x: jnp.repeat(x, num_samples, axis=0), state)


def cache_logical_axes(state: DecodeState) -> DecodeState:
  """A DecodeState-shaped tree of logical-axis PartitionSpecs (map them with the mesh rules)."""
  cache = state.cache
  return DecodeState(
      cache={"k": [PartitionSpec(*CACHE_AXES)] * len(cache["k"]),
             "v": [PartitionSpec(*CACHE_AXES)] * len(cache["v"]),
             "valid": PartitionSpec("cache_batch", "cache_length"),
             "next_pos": PartitionSpec("cache_batch")},
      logits=PartitionSpec("cache_batch", "vocab"), end=state.end)


def init_state(config: ModelConfig, batch_size: int, max_length: int) -> DecodeState:
  """An empty cache of `max_length` slots for `batch_size` rows (zeros, all slots invalid)."""
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
  if max_length > config.max_position_embeddings:
    raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                     f"{config.max_position_embeddings}")
  shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
  dt = config.compute_dtype
  cache = {"k": [jnp.zeros(shape, dt) for _ in range(config.num_layers)],
           "v": [jnp.zeros(shape, dt) for _ in range(config.num_layers)],
           "valid": jnp.zeros((batch_size, max_length), bool),
           "next_pos": jnp.zeros((batch_size,), jnp.int32)}
  return DecodeState(cache=cache, logits=jnp.zeros((batch_size, config.vocab_size), jnp.float32),
                     end=0)


def _bucket(length: int) -> int:
  """Rounds an extension length up to a power of two (>= 8) so few shapes get compiled."""
  return max(8, 1 << (length - 1).bit_length())


def extension_width(length: int, chunk: int) -> int:
  """Slots an extension of `length` tokens takes: a bucket, or whole prefill chunks."""
  return _bucket(length) if length <= chunk else -(-length // chunk) * chunk


def _left_padded(sequences: Sequence[Sequence[int]], width: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(sequences), width), pad_id, np.int32)
  valid = np.zeros((len(sequences), width), bool)
  for i, seq in enumerate(sequences):
    if len(seq):
      tokens[i, width - len(seq):] = seq
      valid[i, width - len(seq):] = True
  return tokens, valid


_RECORDS = ("token", "logprob", "entropy", "mask")  # the decode loop's per-step record

# Measured on an H200 (Qwen2.5-1.5B, docs/sampling.md): the fused step beats XLA's at batch 1
# (1.61 vs 1.73 ms/token) but not at batch 4 (3.09 vs 1.77): its matvecs keep one accumulator
# per row, so their cost grows with the rows.
AUTO_FUSED_MAX_BATCH = 1
# XLA options for the decode loop on GPU: XLA's default command buffers plus WHILE and
# CONDITIONAL, so the whole loop replays as one CUDA graph instead of returning to the host
# for each step's loop condition (-5% to -11% per token at batch 1 on an H200, docs/sampling.md).
GPU_DECODE_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer":
        "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"}


@functools.lru_cache(maxsize=32)
def _jitted_steps(config: ModelConfig, pad_id: int, donate: bool, kernels: str,
                  fused_max_batch: int,
                  compiler_options: tuple[tuple[str, str], ...] = ()):
  """(chunk_fn, decode_fn) jitted once per setting, shared by Samplers."""
  donate_args = (1,) if donate else ()

  def chunk_fn(params, cache, tokens, token_valid, end):
    return forward_chunk(params, config, cache, tokens, token_valid, end)

  decode_fn = jax.jit(functools.partial(_decode_loop, config=config, pad_id=pad_id,
                                        kernels=kernels, fused_max_batch=fused_max_batch),
                      static_argnames=("sampling", "max_new_tokens", "stop_ids"),
                      donate_argnums=donate_args,
                      compiler_options=dict(compiler_options) or None)
  return jax.jit(chunk_fn, donate_argnums=donate_args), decode_fn


class Sampler:
  """Jitted prefill / extend / decode for one model config. Holds no weights or cache."""

  def __init__(self, config: ModelConfig, *, pad_id: int = 0, prefill_chunk: int = 512,
               donate: bool = True, kernels: str = "auto",
               compiler_options: dict[str, str] | None = None):
    """pad_id fills generated slots after a stop; prefill_chunk bounds the attention scores
    memory of prefill ([B, Hq, chunk, S] float32); donate reuses the cache buffers in place
    (the DecodeState passed to `extend`/`decode` must not be used again); kernels picks the
    decode step's implementation: "xla", "fused" (`kat_jax.kernels.decode`, used when the
    batch has at most `MAX_BATCH` rows, else XLA), "fused_interpret" (the same in Pallas
    interpret mode, for CPU tests) or "auto" (on a single GPU "fused" for batches of at most
    `AUTO_FUSED_MAX_BATCH` rows, where it measured faster, else "xla"); compiler_options are
    XLA options for the decode loop's compilation (as `jax.jit(compiler_options=...)` takes
    them; an unknown name or value fails at the first decode); None means
    `GPU_DECODE_COMPILER_OPTIONS` on a single GPU and none elsewhere, {} none anywhere."""
    if prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if kernels not in ("auto", "xla", "fused", "fused_interpret"):
      raise ValueError(f"kernels must be 'auto', 'xla', 'fused' or 'fused_interpret', "
                       f"got {kernels!r}")
    # Both GPU defaults were measured on one GPU; sharded samplers keep XLA's choices.
    single_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
    fused_max_batch = MAX_BATCH
    if kernels == "auto":
      kernels = "fused" if single_gpu else "xla"
      fused_max_batch = AUTO_FUSED_MAX_BATCH
    self.kernels = kernels
    if compiler_options is None and single_gpu:
      compiler_options = GPU_DECODE_COMPILER_OPTIONS
    self.compiler_options = dict(compiler_options or {})
    self.config = config
    self.pad_id = int(pad_id)
    self.prefill_chunk = int(prefill_chunk)
    self._chunk_fn, self._decode_fn = _jitted_steps(config, self.pad_id, donate, kernels,
                                                    fused_max_batch,
                                                    tuple(sorted(self.compiler_options.items())))

  def _check_params(self, params: Any) -> None:
    if not isinstance(params, DecodeParams):
      raise ValueError("Sampler methods take DecodeParams; convert the model's param tree once "
                       "with kat_jax.sampling.prepare_params(params, config)")

  def prefill(self, params: DecodeParams, prompts: Sequence[Sequence[int]], *,
              max_length: int) -> DecodeState:
    """Prompts (ragged token lists, each non-empty) -> a DecodeState of `max_length` slots."""
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("prefill needs at least one prompt and no empty prompt")
    state = init_state(self.config, len(prompts), max_length)
    return self.extend(params, state, prompts)

  def extend(self, params: DecodeParams, state: DecodeState,
             sequences: Sequence[Sequence[int]]) -> DecodeState:
    """Appends one token list per row (e.g. a tool response + the next assistant header).

    Rows given an empty list keep their logits. Equals a fresh prefill of each row's whole
    text (tested).
    """
    self._check_params(params)
    if len(sequences) != state.batch_size:
      raise ValueError(f"got {len(sequences)} sequences for a batch of {state.batch_size} rows")
    longest = max(len(s) for s in sequences)
    if longest == 0:
      return state
    room = state.max_length - state.end
    if longest > room:
      raise ValueError(f"appending {longest} tokens at slot {state.end} overflows the cache of "
                       f"{state.max_length} slots; use a larger max_length")
    chunk = self.prefill_chunk
    width = min(extension_width(longest, chunk), room)
    tokens, valid = _left_padded(sequences, width, self.pad_id)
    old_logits = state.logits
    cache, end = state.cache, state.end
    for start in range(0, width, chunk):
      stop = min(start + chunk, width)
      cache, logits = self._chunk_fn(params, cache, jnp.asarray(tokens[:, start:stop]),
                                     jnp.asarray(valid[:, start:stop]), jnp.int32(end))
      end += stop - start
    has_new = jnp.asarray([len(s) > 0 for s in sequences])
    logits = jnp.where(has_new[:, None], logits, old_logits)
    return DecodeState(cache=cache, logits=logits, end=end)

  def decode(self, params: DecodeParams, state: DecodeState, rng: jax.Array, *,
             max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
             stop_ids: Sequence[int] = ()) -> tuple[GenerationResult, DecodeState]:
    """Samples up to `max_new_tokens` per row; returns the result and the continued state."""
    self._check_params(params)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if state.end + max_new_tokens > state.max_length:
      raise ValueError(f"decoding {max_new_tokens} tokens from slot {state.end} overflows the "
                       f"cache of {state.max_length} slots; use a larger max_length")
    result, cache, logits = self._decode_fn(
        params, state.cache, state.logits, rng, jnp.int32(state.end), sampling=sampling,
        max_new_tokens=int(max_new_tokens), stop_ids=tuple(int(s) for s in stop_ids))
    return result, DecodeState(cache=cache, logits=logits, end=state.end + max_new_tokens)

  def generate(self, params: DecodeParams, prompts: Sequence[Sequence[int]], rng: jax.Array, *,
               max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids: Sequence[int] = (), num_samples: int = 1,
               max_length: int | None = None) -> GenerationResult:
    """Prefill once, fork `num_samples` per prompt (rows grouped by prompt), decode."""
    if max_length is None:
      longest = max((len(p) for p in prompts), default=1)
      max_length = extension_width(longest, self.prefill_chunk) + max_new_tokens
    state = fork(self.prefill(params, prompts, max_length=max_length), num_samples)
    result, _ = self.decode(params, state, rng, max_new_tokens=max_new_tokens,
                            sampling=sampling, stop_ids=stop_ids)
    return result


def _decode_loop(params: DecodeParams, cache: dict[str, Any], logits: jax.Array, rng: jax.Array,
                 end: jax.Array, *, config: ModelConfig, pad_id: int, sampling: SamplingParams,
                 max_new_tokens: int, stop_ids: tuple[int, ...], kernels: str = "xla",
                 fused_max_batch: int = MAX_BATCH
                 ) -> tuple[GenerationResult, dict[str, Any], jax.Array]:
  """The jitted loop: sample -> record -> feed, until all rows stopped or N tokens.

  Inactive rows (stopped) write pad tokens into invalid slots and keep their logits.
  """
  batch = logits.shape[0]
  if config.vocab_size > 2**24:
    raise ValueError(f"vocab_size {config.vocab_size} > 2**24: token ids would not be exact in "
                     "the decode loop's float32 records")
  if kernels != "xla" and (batch > fused_max_batch or not fused_kernels_fit(config, batch)):
    kernels = "xla"
  stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None
  # RoPE rows for every slot's position, once per call (a position never exceeds its slot).
  rope = rope_tables(config, cache["valid"].shape[1])
  # Per step one [B, 1, 4] write of (token, log-prob, entropy, mask) as float32 (token ids are
  # exact below 2**24) instead of four writes: each is a kernel of its own at batch 1.
  init = dict(step=jnp.int32(0), cache=cache, logits=logits, rng=rng,
              done=jnp.zeros((batch,), bool),
              records=jnp.zeros((batch, max_new_tokens, len(_RECORDS)), jnp.float32))

  def step(c):
    rng, key = c["rng"], None
    if not sampling.greedy:  # greedy draws nothing: no key-splitting kernel per step
      rng, key = jax.random.split(rng)
    active = ~c["done"]
    token, logprob, entropy = sample_with_stats(c["logits"], key, sampling)
    token = jnp.where(active, token, pad_id)
    index = c["step"]
    done = c["done"]
    if stops is not None:
      done = done | (active & jnp.any(token[:, None] == stops[None, :], axis=-1))
    new_cache, new_logits = forward_chunk(params, config, c["cache"], token[:, None],
                                          active[:, None], end + index, kernels, rope=rope)
    record = jnp.stack([token.astype(jnp.float32), jnp.where(active, logprob, 0.0),
                        jnp.where(active, entropy, 0.0), active.astype(jnp.float32)], axis=-1)
    return dict(step=index + 1, cache=new_cache,
                logits=jnp.where(active[:, None], new_logits, c["logits"]), rng=rng, done=done,
                records=jax.lax.dynamic_update_slice(c["records"], record[:, None],
                                                     (0, index, 0)))

  def running(c):
    return (c["step"] < max_new_tokens) & ~jnp.all(c["done"])

  out = jax.lax.while_loop(running, step, init)
  records = dict(zip(_RECORDS, jnp.moveaxis(out["records"], -1, 0)))
  mask = records["mask"] > 0
  # Steps never run (all rows stopped first) hold zeros: pad tokens there.
  tokens = jnp.where(mask, records["token"].astype(jnp.int32), pad_id)
  result = GenerationResult(tokens=tokens, logprobs=records["logprob"],
                            entropies=records["entropy"], mask=mask, stopped=out["done"])
  return result, out["cache"], out["logits"]

