"""Token losses under the `pred_index` contract, computed in sequence chunks.

Token t is predicted from the hidden state at `pred_index[t]`; its loss is
`weights[t] * loss(logits(hidden[pred_index[t]]), tokens[t])`. The LM head and the
float32 log-softmax run chunk by chunk (rematerialised in the backward pass), so the
full [B, T, V] float32 logits never exist at once — the 152k-entry vocabulary makes
them the largest tensor of a step otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_predicting_hidden(hidden: jax.Array, pred_index: jax.Array) -> jax.Array:
  """hidden [B,T,d], pred_index [B,T] -> the hidden state that predicts each token [B,T,d]."""
  return jnp.take_along_axis(hidden, pred_index[..., None].astype(jnp.int32), axis=1)


@jax.custom_vjp
def head_logits(hidden: jax.Array, head_kernel: jax.Array) -> jax.Array:
  """float32 logits [N,V] of hidden [N,d] (compute dtype) through head_kernel [d,V].

  The product runs in the hidden states' dtype with float32 accumulation. In the backward
  pass the float32 logit gradient is rounded to that dtype too, so both gradient products
  are 16-bit matmuls (autodiff would promote them to float32 ones, the costliest products of
  a bf16 step after the layers) while dhidden and dkernel still accumulate in float32. With
  float32 hidden states everything stays float32 and this equals plain autodiff.
  """
  return jnp.einsum("nd,dv->nv", hidden, head_kernel.astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


def _head_logits_fwd(hidden, head_kernel):
  return head_logits(hidden, head_kernel), (hidden, head_kernel)


def _head_logits_bwd(residuals, g):
  hidden, head_kernel = residuals
  g = g.astype(hidden.dtype)
  d_hidden = jnp.einsum("nv,dv->nd", g, head_kernel.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
  d_kernel = jnp.einsum("nd,nv->dv", hidden, g, preferred_element_type=jnp.float32)
  return d_hidden.astype(hidden.dtype), d_kernel.astype(head_kernel.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def split_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[N, ...] -> [N/chunk, chunk, ...], zero-padding N up to a multiple of `chunk`."""
  pad = (-x.shape[0]) % chunk
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
  return x.reshape((-1, chunk) + x.shape[1:])


def chunked_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, tokens: jax.Array,
                          pred_index: jax.Array, weights: jax.Array, *,
                          chunk_size: int = 1024, z_loss: float = 0.0,
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted next-token cross-entropy, summed (not averaged) over tokens.

  Args:
    hidden: [B,T,d] final-normed hidden states (compute dtype).
    head_kernel: [d,V] LM head (the transposed embedding when tied).
    tokens: [B,T] int32 targets.
    pred_index: [B,T] int32 index of the predicting hidden state of each target.
    weights: [B,T] float32 loss weight per target.
    chunk_size: tokens per LM-head chunk.
    z_loss: coefficient of the log(Z)² stabiliser (PaLM); 0 disables it.

  Returns:
    (sum_t weights[t] * (ce[t] + z_loss * logZ[t]²), aux) where aux holds the
    weighted sums `ce_sum`, `correct_sum` (argmax hits) and `weight_sum`.
  """
  d = hidden.shape[-1]
  pred_hidden = gather_predicting_hidden(hidden, pred_index).reshape(-1, d)
  flat_tokens = tokens.reshape(-1)
  flat_weights = weights.reshape(-1).astype(jnp.float32)
  chunk = min(chunk_size, flat_tokens.shape[0])
  xs = (split_chunks(pred_hidden, chunk), split_chunks(flat_tokens, chunk),
        split_chunks(flat_weights, chunk))

  @jax.checkpoint
  def chunk_loss(h, t, w):
    logits = head_logits(h, head_kernel)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    ce = log_z - target
    correct = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
    loss = jnp.sum(w * (ce + z_loss * log_z**2))
    return loss, jnp.sum(w * ce), jnp.sum(w * correct)

  def body(carry, x):
    loss, ce, correct = chunk_loss(*x)
    return (carry[0] + loss, carry[1] + ce, carry[2] + correct), None

  zero = jnp.zeros((), jnp.float32)
  (loss, ce_sum, correct_sum), _ = jax.lax.scan(body, (zero, zero, zero), xs)
  aux = {"ce_sum": ce_sum, "correct_sum": correct_sum, "weight_sum": jnp.sum(flat_weights)}
  return loss, aux


def full_logits_cross_entropy(logits: jax.Array, tokens: jax.Array, pred_index: jax.Array,
                              weights: jax.Array) -> jax.Array:
  """Reference for `chunked_cross_entropy`: logits [B,T,V] of every position, summed CE."""
  pred_logits = jnp.take_along_axis(logits, pred_index[..., None], axis=1).astype(jnp.float32)
  log_probs = jax.nn.log_softmax(pred_logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
  return jnp.sum(weights * nll)


def chunked_token_logprobs(hidden: jax.Array, head_kernel: jax.Array, tokens: jax.Array,
                           pred_index: jax.Array, *, chunk_size: int = 1024,
                           with_entropy: bool = False, temperature: float = 1.0
                           ) -> tuple[jax.Array, jax.Array | None]:
  """log π(tokens[t] | context) and (optionally) the entropy of π at each predicting state.

  With `temperature` ≠ 1, π is softmax(logits / temperature): the distribution rollouts
  sampled from, so that RL ratios compare like with like (as verl does).

  Same chunking as `chunked_cross_entropy`: the [B, T, V] float32 logits never exist at
  once. Returns (logp [B,T] float32, entropy [B,T] float32 or None); positions whose
  weight is 0 downstream are computed too (they are cheap next to the head).
  """
  batch, length = tokens.shape
  d = hidden.shape[-1]
  pred_hidden = gather_predicting_hidden(hidden, pred_index).reshape(-1, d)
  flat_tokens = tokens.reshape(-1)
  chunk = min(chunk_size, flat_tokens.shape[0])

  @jax.checkpoint
  def chunk_fn(h, t):
    logits = head_logits(h, head_kernel)
    log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(log_probs, t[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) if with_entropy else logp
    return logp, entropy

  _, (logp, entropy) = jax.lax.scan(
      lambda c, x: (c, chunk_fn(*x)), None,
      (split_chunks(pred_hidden, chunk), split_chunks(flat_tokens, chunk)))
  n = batch * length
  logp = logp.reshape(-1)[:n].reshape(batch, length)
  entropy = entropy.reshape(-1)[:n].reshape(batch, length) if with_entropy else None
  return logp, entropy
