"""A whole decoder layer as one kernel for one-token decode steps (Pallas on Triton).

`kat_jax.kernels.decode` runs a layer in six launches (q/k/v, attention blocks, their merge,
o, gate/up, down). At batch 1 each launch costs a few microseconds beyond its bytes: the
kernel starts with nothing in flight, waits one memory latency for its first weights and ends
with a tail of programs while most SMs sit idle. On an H200 that overhead was ~40% of the
step (docs/sampling.md). This kernel runs the same five phases in one launch:

  programs [0, n_qkv)   RMSNorm -> q/k/v rows (+ bias)           -> signal QKV
  next n_attention      RoPE, cache write, one slot block each   -> the last block of a
                        head merges the head's blocks            -> signal MERGED
  next n_o              o rows + residual                        -> signal O
  next n_gate_up        RMSNorm -> gate/up rows -> SiLU(g)*u     -> signal GATE_UP
  next n_down           down rows + residual -> the layer's output

A program of phase p first issues the loads that need nothing from this layer (its weight
rows, or its block of the cache), then waits until phase p-1's counter reaches that phase's
program count, then reads the phase's input. So the next phase's weights stream while the
previous phase finishes, and no launch separates them.

Ordering. A producer stores its outputs, synchronises its threads, then increments a counter
with an acquire-release atomic (GPU scope); a consumer spins on the counter with
acquire-release atomic reads (adding 0) before reading. Programs only wait for programs
with smaller ids, which the GPU dispatches first (in increasing id order, as CUDA hardware
does), so every awaited program is running or done and the spin ends. A spin is bounded
(`_MAX_POLLS`): if it runs out, the layer's TIMED_OUT counter is set (the tests check it), so
a broken assumption shows as a flag instead of a hang. Interpret mode runs the programs one at
a time in id order, so there every wait is already satisfied when it is checked.

The phases reuse the program bodies of `kat_jax.kernels.decode` (`_matvec_program`,
`_attention_block`, `_merge_blocks`), so both paths compute the same numbers;
`decode_layer_reference` is the plain-JAX definition.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kat_jax.kernels.decode import (MAX_BATCH, Window, _attention_block, _check_attention,
                                    _chunk, _compiler_params, _matvec_program, _merge_blocks,
                                    _merge_chunk, _signal, _used_blocks,
                                    decode_attention_reference, matvec_reference)

# Counter slots of one layer's row: phase completions, the timeout flag, then one per
# (row, query head) counting that head's finished slot blocks.
QKV, MERGED, O, GATE_UP, TIMED_OUT, HEAD_BLOCKS = range(6)
_MAX_POLLS = 1 << 20  # about a second of polling before a wait gives up and flags it

# Rows per program of each product and warps per program (one warp count serves all phases):
# the fastest of benchmarks/decode_layer_sweep.py on an H200 at Qwen2.5-1.5B shapes. Small
# gate/up and down tiles keep the kernel's register count, which every phase pays, low.
LAYER_TILES: dict[str, Any] = dict(qkv=8, o=4, gate_up=4, down=1, block_s=None, num_warps=4)


def layer_counters(num_layers: int, batch: int, num_q_heads: int) -> jax.Array:
  """Zeroed counters for `num_layers` calls of `decode_layer`: int32 [L, 5 + B*Hq]."""
  return jnp.zeros((num_layers, HEAD_BLOCKS + batch * num_q_heads), jnp.int32)


def decode_layer_reference(h: jax.Array, layer: dict[str, jax.Array], cos: jax.Array,
                           sin: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           valid: jax.Array, end: jax.Array, *, num_q_heads: int, eps: float
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain JAX for `decode_layer`: the five reference products of `kat_jax.kernels.decode`."""
  qkv = matvec_reference(h, layer["qkv"], norm_scale=layer["input_norm"], eps=eps,
                         bias=layer.get("qkv_bias"))
  attn, k_cache, v_cache = decode_attention_reference(qkv, cos, sin, k_cache, v_cache, valid,
                                                      end, num_q_heads=num_q_heads)
  h = matvec_reference(attn, layer["o"], residual=h)
  act = matvec_reference(h, layer["gate_up"], norm_scale=layer["post_attn_norm"], eps=eps,
                         swiglu=True)
  return matvec_reference(act, layer["down"], residual=h), k_cache, v_cache


def _index(layer: jax.Array, slot) -> tuple[jax.Array, jax.Array]:
  return layer, jnp.asarray(slot, jnp.int32)


def _await(counters_ref, layer: jax.Array, slot: int, target: int, interpret: bool) -> None:
  """Spins until counters[layer, slot] >= target; later reads see the counted programs' writes.

  Each poll is an acquire-release atomic add of 0. Plain volatile loads in the loop did not
  work on the H200: the compiler hoisted a load from a loop-invariant address out of the loop,
  and one whose address came from the previous poll still timed out in the GPU test.
  """
  read = lambda: plgpu.atomic_add(counters_ref, _index(layer, slot), jnp.int32(0))
  if interpret:  # programs run one at a time in id order: the count is final already
    count = read()
  else:
    def waiting(carry):
      count, polls = carry
      return (count < target) & (polls < _MAX_POLLS)

    count, _ = lax.while_loop(waiting, lambda carry: (read(), carry[1] + 1), (read(), 0))

  @pl.when(count < target)
  def _flag_timeout():
    plgpu.atomic_add(counters_ref, _index(layer, TIMED_OUT), jnp.int32(1))


def _layer_kernel(*refs, has_bias, batch, hidden, intermediate, num_q_heads,
                  num_kv_heads, head_dim, cache_len, eps, tiles, block_s, splits, interpret):
  refs = list(refs)
  (end_ref, layer_ref, h_ref, norm1_ref, wqkv_ref) = refs[:5]
  bias_ref = refs[5] if has_bias else None
  (cos_ref, sin_ref, valid_ref, k_ref, v_ref, wo_ref, norm2_ref, wgu_ref, wd_ref,
   _, h_out_ref, k_out_ref, v_out_ref, counters_ref, qkv_ref, acc_ref, stats_ref, attn_ref,
   h_mid_ref, act_ref) = refs[5 + has_bias:]
  layer = layer_ref[0]  # a runtime value, so all layers' calls are one kernel
  hq, hkv, d, f = num_q_heads, num_kv_heads, hidden, intermediate
  groups = hq // hkv
  n_qkv = (hq + 2 * hkv) * head_dim // tiles["qkv"]
  n_attention = batch * hq * splits
  n_o = d // tiles["o"]
  n_gate_up = f // tiles["gate_up"]
  n_down = d // tiles["down"]
  sizes = dict(batch=batch, eps=eps)
  rows_b, whole_d = pl.ds(0, batch), pl.ds(0, d)
  signal = functools.partial(_signal, counters_ref, layer, interpret=interpret)
  wait = lambda slot, target: functools.partial(_await, counters_ref, layer, slot, target,
                                                interpret)

  def qkv_phase(i):
    rows = pl.ds(i * tiles["qkv"], tiles["qkv"])
    _matvec_program(h_ref, [Window(wqkv_ref, (rows, whole_d))], Window(qkv_ref, (rows_b, rows)),
                    scale_ref=norm1_ref,
                    bias_ref=None if bias_ref is None else Window(bias_ref, (rows,)),
                    k_size=d, chunk=_chunk(d), swiglu=False, **sizes)
    signal(QKV)

  def attention_phase(i):
    b, head, split = i // (hq * splits), i // splits % hq, i % splits
    end = end_ref[0]
    used = _used_blocks(end, block_s)

    @pl.when(split < used)
    def _block():
      group = head // groups
      cache = lambda ref: Window(ref, (b, pl.ds(0, cache_len), group, pl.ds(0, head_dim)))
      _attention_block(b, head, split, end, qkv_ref, cos_ref, sin_ref, valid_ref, cache(k_ref),
                       cache(v_ref), Window(acc_ref, (b, split, head, pl.ds(0, head_dim))),
                       Window(stats_ref, (b, split, head, pl.ds(0, 2))), cache(k_out_ref),
                       cache(v_out_ref),
                       groups=groups, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                       block_s=block_s, await_inputs=wait(QKV, n_qkv))
      finished = signal(HEAD_BLOCKS + b * hq + head)

      @pl.when(finished == used - 1)  # the head's last block to finish merges them all
      def _merge():
        _merge_blocks(b, head, used, acc_ref, stats_ref, attn_ref, chunk=_merge_chunk(splits),
                      head_dim=head_dim)
        signal(MERGED)

  def o_phase(i):
    rows = pl.ds(i * tiles["o"], tiles["o"])
    _matvec_program(attn_ref, [Window(wo_ref, (rows, pl.ds(0, hq * head_dim)))],
                    Window(h_mid_ref, (rows_b, rows)), res_ref=Window(h_ref, (rows_b, rows)),
                    k_size=hq * head_dim,
                    chunk=_chunk(hq * head_dim), swiglu=False,
                    await_inputs=wait(MERGED, batch * hq), **sizes)
    signal(O)

  def gate_up_phase(i):
    block = tiles["gate_up"]
    gate, up = pl.ds(i * block, block), pl.ds(f + i * block, block)
    _matvec_program(h_mid_ref, [Window(wgu_ref, (gate, whole_d)), Window(wgu_ref, (up, whole_d))],
                    Window(act_ref, (rows_b, gate)), scale_ref=norm2_ref, k_size=d, chunk=_chunk(d),
                    swiglu=True, await_inputs=wait(O, n_o), **sizes)
    signal(GATE_UP)

  def down_phase(i):
    rows = pl.ds(i * tiles["down"], tiles["down"])
    _matvec_program(act_ref, [Window(wd_ref, (rows, pl.ds(0, f)))],
                    Window(h_out_ref, (rows_b, rows)), res_ref=Window(h_mid_ref, (rows_b, rows)),
                    k_size=f, chunk=_chunk(f), swiglu=False,
                    await_inputs=wait(GATE_UP, n_gate_up), **sizes)

  pid = pl.program_id(0)
  start = 0
  for phase, count in ((qkv_phase, n_qkv), (attention_phase, n_attention), (o_phase, n_o),
                       (gate_up_phase, n_gate_up), (down_phase, n_down)):
    pl.when((pid >= start) & (pid < start + count))(functools.partial(phase, pid - start))
    start += count


def decode_layer(h: jax.Array, layer: dict[str, jax.Array], cos: jax.Array, sin: jax.Array,
                 k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array, end: jax.Array,
                 counters: jax.Array, *, layer_index: int, num_q_heads: int, eps: float,
                 tiles: dict[str, Any] | None = None, interpret: bool = False,
                 return_phases: bool = False) -> tuple[jax.Array, ...]:
  """One decoder layer for one new token per row, as a single kernel.

  Args:
    h: [B, d] the layer's input rows (B <= MAX_BATCH), the compute dtype.
    layer: output-major weights as `kat_jax.sampling.forward.DecodeParams.layers` holds them:
      input_norm [d], qkv [(Hq+2Hkv)D, d], optional qkv_bias, o [d, Hq D], post_attn_norm [d],
      gate_up [2F, d] (gate rows, then up rows), down [d, F].
    cos, sin: [B, D] RoPE tables at each row's position.
    k_cache, v_cache: [B, S, Hkv, D]; slot `end` receives the new key/value.
    valid: [B, S] which slots hold real tokens, slot `end` included.
    end: int32 scalar, the new token's slot.
    counters: int32 [L, 5 + B Hq] from `layer_counters`, zero in row `layer_index` (each row
      serves one call; thread the returned array into the next layer's call).
    layer_index: which counter row this call uses.
    tiles: rows per program of each product, the slot block and warps (`LAYER_TILES`).

  Returns:
    (h_out [B, d], k_cache, v_cache, counters). counters[layer_index, TIMED_OUT] > 0 means a
    wait gave up (the GPU did not run the programs as assumed) and h_out is not valid.
  """
  tiles = {**LAYER_TILES, **(tiles or {})}
  batch, hidden = h.shape
  _, cache_len, num_kv_heads, head_dim = k_cache.shape
  n_qkv, intermediate = layer["qkv"].shape[0], layer["down"].shape[1]
  if not 1 <= batch <= MAX_BATCH:
    raise ValueError(f"decode_layer takes 1..{MAX_BATCH} rows, got {batch}")
  block_s = _check_attention((batch, n_qkv), k_cache.shape, num_q_heads, tiles["block_s"])
  for name, size in (("qkv", n_qkv), ("o", hidden), ("gate_up", intermediate),
                     ("down", hidden)):
    block = tiles[name]
    if block < 1 or block & (block - 1) or size % block:
      raise ValueError(f"tiles[{name!r}] = {block} must be a power of two dividing {size}")
  for k_size in (hidden, intermediate, num_q_heads * head_dim):
    if _chunk(k_size) < 16:
      raise ValueError(f"K={k_size} needs a power-of-two factor >= 16")
  if counters.shape != (counters.shape[0], HEAD_BLOCKS + batch * num_q_heads) or not (
      0 <= layer_index < counters.shape[0]):
    raise ValueError(f"counters {counters.shape} do not fit layer {layer_index} of a batch of "
                     f"{batch} with {num_q_heads} heads (use layer_counters)")
  splits = -(-cache_len // block_s)
  has_bias = "qkv_bias" in layer
  dt = h.dtype
  inputs = [jnp.reshape(jnp.asarray(end, jnp.int32), (1,)), jnp.full((1,), layer_index, jnp.int32),
            h, layer["input_norm"],
            layer["qkv"]] + ([layer["qkv_bias"]] if has_bias else []) + [
                cos, sin, valid.astype(jnp.int32), k_cache, v_cache, layer["o"],
                layer["post_attn_norm"], layer["gate_up"], layer["down"], counters]
  first_alias = 8 + has_bias  # k_cache; v_cache and counters follow it
  outputs = [(batch, hidden, dt), k_cache, v_cache, counters,
             (batch, n_qkv, dt), (batch, splits, num_q_heads, head_dim, jnp.float32),
             (batch, splits, num_q_heads, 2, jnp.float32),
             (batch, num_q_heads * head_dim, dt), (batch, hidden, dt),
             (batch, intermediate, dt)]
  out_shape = [jax.ShapeDtypeStruct(o.shape, o.dtype) if hasattr(o, "shape")
               else jax.ShapeDtypeStruct(o[:-1], o[-1]) for o in outputs]
  programs = (n_qkv // tiles["qkv"] + batch * num_q_heads * splits + hidden // tiles["o"]
              + intermediate // tiles["gate_up"] + hidden // tiles["down"])
  kernel = functools.partial(
      _layer_kernel, has_bias=has_bias, batch=batch, hidden=hidden,
      intermediate=intermediate, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
      head_dim=head_dim, cache_len=cache_len, eps=float(eps), tiles=tiles, block_s=block_s, splits=splits,
      interpret=interpret)
  outputs = pl.pallas_call(
      kernel, grid=(programs,), out_shape=out_shape,
      input_output_aliases={first_alias: 1, first_alias + 1: 2, len(inputs) - 1: 3},
      compiler_params=_compiler_params(tiles["num_warps"], interpret), interpret=interpret,
      name="decode_layer")(*inputs)
  if return_phases:  # also (qkv, acc, stats, attention output, h after attention, act)
    return tuple(outputs)
  return tuple(outputs[:4])
