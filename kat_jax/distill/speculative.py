"""Self-speculative greedy decoding: draft with the MTP heads, verify with the main model.

Each round: the main model's greedy next token `a` is certain; MTP depth k at the last
position, fed `a` and the earlier drafts, proposes token k after `a` (k = 1..D); one main
forward over the sequence + `a` + drafts verifies them, keeping the longest prefix that equals
the main model's own greedy choices, plus the main model's token after it. The output is
therefore exactly plain greedy decoding (DeepSeek-V3 §5.4.3 reports 85–90% acceptance of the
second token). This version re-runs full forwards over a fixed-size buffer (one compilation);
a KV-cache drafter belongs with `kat_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kat_jax.model import Decoder, ModelConfig
from kat_jax.model.mtp import MTPHeads, mtp_depth_of, split_mtp


@dataclasses.dataclass
class SpeculativeStats:
  drafted: int = 0
  accepted: int = 0
  main_forwards: int = 0

  @property
  def accept_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else 0.0


def _main_fn(config: ModelConfig):
  model = Decoder(config)

  @jax.jit
  def run(params, tokens):
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    logits = model.apply({"params": params}, hidden, method=Decoder.logits)
    return hidden, jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  return run


def _draft_fn(config: ModelConfig, depth: int):
  model, mtp = Decoder(config), MTPHeads(config, depth)

  @jax.jit
  def run(params, mtp_params, hidden, tokens, position):
    outs = mtp.apply({"params": mtp_params}, hidden, tokens, params["embed"]["embedding"])
    at = jnp.stack([h[0, position] for h in outs])  # [D, d]
    logits = model.apply({"params": params}, at, method=Decoder.logits)
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)  # [D]
  return run


def _buffer(tokens: Sequence[int], size: int, pad: int) -> jnp.ndarray:
  buf = np.full((1, size), pad, np.int32)
  buf[0, :len(tokens)] = tokens
  return jnp.asarray(buf)


def _finish(generated: list[int], max_new_tokens: int, stop_ids: Sequence[int]) -> list[int]:
  out = generated[:max_new_tokens]
  for i, t in enumerate(out):
    if t in stop_ids:
      return out[:i + 1]
  return out


def greedy_decode(params, config: ModelConfig, prompt: Sequence[int], max_new_tokens: int, *,
                  stop_ids: Sequence[int] = (), buffer_size: int | None = None,
                  pad_id: int = 0) -> list[int]:
  """Plain greedy decoding by full forwards (the reference for speculative decoding)."""
  decoder_params, _ = split_mtp(params)
  size = buffer_size or len(prompt) + max_new_tokens + 1
  main = _main_fn(config)
  seq = list(prompt)
  for _ in range(max_new_tokens):
    _, greedy = main(decoder_params, _buffer(seq, size, pad_id))
    seq.append(int(greedy[0, len(seq) - 1]))
    if seq[-1] in stop_ids:
      break
  return seq[len(prompt):]


def self_speculative_decode(params, config: ModelConfig, prompt: Sequence[int],
                            max_new_tokens: int, *, stop_ids: Sequence[int] = (),
                            pad_id: int = 0) -> tuple[list[int], SpeculativeStats]:
  """Greedy generation drafted by the MTP heads in `params["mtp"]`. Returns (tokens, stats)."""
  depth = mtp_depth_of(params)
  if depth < 1:
    raise ValueError("self-speculative decoding needs MTP heads (params has no 'mtp' key)")
  if not prompt:
    raise ValueError("prompt must hold at least one token")
  decoder_params, mtp_params = split_mtp(params)
  size = len(prompt) + max_new_tokens + depth + 1
  main, draft = _main_fn(config), _draft_fn(config, depth)
  stats = SpeculativeStats()
  seq = list(prompt)
  hidden, greedy = main(decoder_params, _buffer(seq, size, pad_id))
  stats.main_forwards += 1
  next_token = int(greedy[0, len(seq) - 1])
  while True:
    generated = seq[len(prompt):] + [next_token]
    if len(generated) >= max_new_tokens or any(t in stop_ids for t in generated):
      return _finish(generated, max_new_tokens, stop_ids), stats
    n = len(seq)
    drafts: list[int] = []
    for k in range(1, depth + 1):
      proposal = draft(decoder_params, mtp_params, hidden,
                       _buffer(seq + [next_token] + drafts, size, pad_id), n - 1)
      drafts.append(int(proposal[k - 1]))
    hidden, greedy = main(decoder_params, _buffer(seq + [next_token] + drafts, size, pad_id))
    stats.main_forwards += 1
    accepted = 0
    while accepted < depth and int(greedy[0, n + accepted]) == drafts[accepted]:
      accepted += 1
    stats.drafted += depth
    stats.accepted += accepted
    seq = seq + [next_token] + drafts[:accepted]
    next_token = int(greedy[0, n + accepted])
