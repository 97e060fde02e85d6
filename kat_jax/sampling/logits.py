"""Token choice from float32 logits: greedy, temperature, top-k, top-p; log-probs and entropies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen (hashable: it is a static argument of the jitted loop).

  temperature 0 means greedy (argmax). top_k 0 and top_p 1.0 switch those filters off.
  The order is HF's: temperature, then top-k, then top-p. Tokens tied with the last kept
  logit are kept too. vocab_limit > 0 never picks ids >= vocab_limit (an embedding table
  padded past the tokenizer's ids); log-probs stay those of the whole model distribution.
  tempered_stats: the recorded log-probs and entropies are those of the tempered
  distribution softmax(logits / temperature) (still unfiltered) instead of the model's own:
  the behaviour log-probs of an RL loss that is tempered like its rollouts.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0
  tempered_stats: bool = False

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.vocab_limit < 0:
      raise ValueError(f"vocab_limit must be >= 0 (0 = off), got {self.vocab_limit}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


def filter_logits(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """logits [B,V] float32 -> tempered logits with the disallowed tokens at -inf."""
  scaled = logits / sampling.temperature
  if sampling.top_k:
    k = min(sampling.top_k, logits.shape[-1])
    kth = jax.lax.top_k(scaled, k)[0][:, -1:]
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  if sampling.top_p < 1.0:
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    kept = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
  return scaled


def choose_tokens(logits: jax.Array, rng: jax.Array | None, sampling: SamplingParams
                  ) -> jax.Array:
  """logits [B,V] float32 -> next tokens [B] int32 (rng may be None when greedy)."""
  if 0 < sampling.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < sampling.vocab_limit, logits, -jnp.inf)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def logprob_and_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Under the model's own (untempered, unfiltered) distribution, as the training forward sees it.

  logits [B,V] float32, tokens [B] -> (log p(token) [B], entropy [B]) float32.

  Two passes over V: the max m, then the sums s = Σ e and t = Σ e·(l - m) with e = exp(l - m)
  (sibling reductions of one input, which XLA can fuse). log p = (l - m) - log s, as
  `jax.nn.log_softmax` rounds it, and entropy = log s - t / s, a sum of two non-negative
  terms. At batch 1 such passes over 151,936 logits are short, latency-bound kernels; fewer
  passes is the point.
  """
  logits = logits.astype(jnp.float32)
  m = jnp.max(logits, axis=-1)
  log_total, entropy = _log_total_and_entropy(logits, m)
  chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - m
  return chosen - log_total, entropy


def _log_total_and_entropy(logits: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B,V] float32 and their max m [B] -> (log Σ e, entropy) [B], e = exp(l - m)."""
  shifted = logits - m[:, None]
  weights = jnp.exp(shifted)
  total = jnp.sum(weights, axis=-1)
  # exp(-inf) * -inf is nan; a masked logit contributes nothing.
  weighted = jnp.sum(jnp.where(weights > 0, weights * shifted, 0.0), axis=-1)
  log_total = jnp.log(total)
  return log_total, log_total - weighted / total


def max_and_argmax(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [B,V] float32 -> (max [B], first index of the max [B] int32) in one reduction.

  Equals (jnp.max, jnp.argmax) for logits without NaN.
  """
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)

  def pick(a, b):  # the larger value; the smaller index among equal values
    (va, ia), (vb, ib) = a, b
    take_a = (va > vb) | ((va == vb) & (ia < ib))
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)

  return jax.lax.reduce((logits, index), (jnp.float32(-jnp.inf), jnp.int32(2**31 - 1)), pick,
                        (1,))


def sample_with_stats(logits: jax.Array, rng: jax.Array | None, sampling: SamplingParams
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`choose_tokens` and `logprob_and_entropy` of the chosen tokens, in fewer passes over V.

  logits [B,V] -> (tokens [B] int32, log p(token) [B], entropy [B]). Greedy over the whole
  vocabulary takes the max and its index in one reduction, and the chosen token's shifted
  logit is exactly 0, so log p = -log Σ e (no gather).
  """
  logits = logits.astype(jnp.float32)
  if sampling.greedy and not 0 < sampling.vocab_limit < logits.shape[-1]:
    m, tokens = max_and_argmax(logits)
    log_total, entropy = _log_total_and_entropy(logits, m)
    return tokens, -log_total, entropy
  tokens = choose_tokens(logits, rng, sampling)
  if sampling.tempered_stats and not sampling.greedy:
    return (tokens,) + logprob_and_entropy(logits / sampling.temperature, tokens)
  return (tokens,) + logprob_and_entropy(logits, tokens)
