"""The policy-gradient train step: pure `(state, batch) -> (state, metrics)`.

Batch (rows may be flat trajectories or packed prefix trees, see DESIGN "Tree RL is exact"):
`tokens`, `positions`, `kv_end`, `pred_index` [B,T] as for pre-training, plus per token
`old_logp` (the policy the update is centred on), `ref_logp` (frozen reference; only read
when beta > 0), in an off-policy batch `behav_logp` (the log-probs the tokens were sampled
with; objectives module: truncated importance weight) and
the weights `adv_pos`, `adv_neg`, `kl_weight` from `objectives.flat_token_weights` (or the
tree packer). The weights already hold the aggregation normaliser of the whole rollout
batch, so the loss is a plain sum and micro-batches/updates just add up.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kat_jax.model import Decoder, ModelConfig, lm_head_kernel
from kat_jax.rl.objectives import ObjectiveConfig, token_objective
from kat_jax.train.losses import chunked_token_logprobs
from kat_jax.train.state import TrainState

POLICY_INPUTS = ("tokens", "positions", "kv_end", "pred_index", "old_logp", "ref_logp",
                 "behav_logp", "adv_pos", "adv_neg", "kl_weight")
# Metrics that are means over a batch's active tokens (the others are sums).
TOKEN_MEANS = ("clip_fraction", "is_weight_mean", "is_capped_fraction")


def make_policy_loss_fn(config: ModelConfig, objective: ObjectiveConfig, *,
                        loss_chunk: int = 1024, temperature: float = 1.0
                        ) -> Callable[[Any, dict], tuple[jax.Array, dict]]:
  """(params, batch) -> (summed objective, metrics); π is tempered like the rollouts.

  A batch without `old_logp` is centred on the weights being differentiated: old_logp is
  stop_gradient(logp) of this very pass, the proximal policy of a single update without a
  second forward pass (the ratio is exactly 1, its gradient that of log π).
  """
  model = Decoder(config)

  def loss_fn(params, batch):
    hidden = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["kv_end"], return_hidden=True)
    logp, entropy = chunked_token_logprobs(
        hidden, lm_head_kernel(params, config), batch["tokens"], batch["pred_index"],
        chunk_size=loss_chunk, with_entropy=bool(objective.entropy_coef),
        temperature=temperature)
    old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    return token_objective(logp, old_logp, batch.get("ref_logp"), entropy,
                           batch["adv_pos"], batch["adv_neg"], batch["kl_weight"], objective,
                           batch.get("behav_logp"))

  return loss_fn


def make_policy_step(config: ModelConfig, optimizer: optax.GradientTransformation,
                     objective: ObjectiveConfig, *, loss_chunk: int = 1024,
                     temperature: float = 1.0
                     ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer update on one (mini-)batch of rollouts sampled at `temperature`."""
  grad_fn = jax.value_and_grad(make_policy_loss_fn(config, objective, loss_chunk=loss_chunk,
                                                   temperature=temperature), has_aux=True)

  def step(state: TrainState, batch: dict):
    batch = {k: batch[k] for k in POLICY_INPUTS if k in batch}
    (loss, metrics), grads = grad_fn(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_logprob_fn(config: ModelConfig, *, loss_chunk: int = 1024, temperature: float = 1.0
                    ) -> Callable[[Any, dict], jax.Array]:
  """(params, batch) -> logp [B,T] of the batch's tokens (old/reference log-probs)."""
  model = Decoder(config)

  def logprob_fn(params, batch):
    hidden = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["kv_end"], return_hidden=True)
    logp, _ = chunked_token_logprobs(hidden, lm_head_kernel(params, config), batch["tokens"],
                                     batch["pred_index"], chunk_size=loss_chunk,
                                     temperature=temperature)
    return logp

  return logprob_fn


class AccumulatedPolicyUpdate:
  """One optimizer update over all rows of a batch, in micro-batches of a fixed shape.

  The policy weights already carry the whole batch's aggregation normaliser, so the batch
  loss and gradient are plain sums over micro-batches: `loss`, `policy_loss`, `kl` and
  `entropy` are summed, `clip_fraction` (and an off-policy batch's importance-weight
  statistics) are averaged over active tokens, `grad_norm` is the
  norm of the summed gradient.
  """

  def __init__(self, model_config: ModelConfig, optimizer: optax.GradientTransformation,
               objective: ObjectiveConfig, micro_batch_rows: int, loss_chunk: int,
               ref_params: Any = None, temperature: float = 1.0):
    """temperature: the sampling temperature of the rollouts; log-probs (loss, reference)
    are taken under the tempered distribution they were sampled from."""
    self.rows, self.optimizer = micro_batch_rows, optimizer
    self.grad_fn = jax.jit(jax.value_and_grad(
        make_policy_loss_fn(model_config, objective, loss_chunk=loss_chunk,
                            temperature=temperature), has_aux=True))
    self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))
    self.apply = jax.jit(self._apply, donate_argnums=(0,))
    self.ref_params = ref_params if objective.beta else None  # settable after construction
    self.logprob_fn = jax.jit(make_logprob_fn(model_config, loss_chunk=loss_chunk,
                                              temperature=temperature))

  def micro_batch_temp_bytes(self, params: Any, batch_spec: dict[str, Any]) -> int | None:
    """Scratch bytes of one micro-batch's gradient pass beyond its inputs (the params, the
    micro-batch) and outputs (one gradient): XLA's temp allocation, on GPU one contiguous
    buffer per call. From the compiled program's memory analysis for `batch_spec` (name ->
    jax.ShapeDtypeStruct [micro_batch_rows, T], the keys a real micro-batch has); None where
    the backend reports none. The compile is cached: a call at these shapes reuses it."""
    spec = {k: batch_spec[k] for k in POLICY_INPUTS if k in batch_spec}
    stats = self.grad_fn.lower(params, spec).compile().memory_analysis()
    return None if stats is None else int(stats.temp_size_in_bytes)

  def _apply(self, state: TrainState, grads: Any) -> tuple[TrainState, jax.Array]:
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (TrainState(step=state.step + 1, params=params, opt_state=opt_state),
            optax.tree.norm(grads))

  def __call__(self, state: TrainState, batch: dict[str, np.ndarray]
               ) -> tuple[TrainState, dict[str, float]]:
    """batch: [B, T] arrays, B a multiple of micro_batch_rows -> (state, metrics).

    A batch without `old_logp` (e.g. an off-policy batch carrying only `behav_logp`) is
    centred on the weights this update starts from (`make_policy_loss_fn`): one update per
    batch needs no separate log-prob pass.

    `state` is donated: its buffers are reused for the new state.
    """
    total_rows = len(batch["tokens"])
    if total_rows % self.rows:
      raise ValueError(f"batch of {total_rows} rows is not a multiple of micro_batch_rows "
                       f"{self.rows}; pad it with pad_batch_rows")
    grads, sums, token_means, active = None, {}, {}, 0.0
    for start in range(0, total_rows, self.rows):
      chunk = {k: batch[k][start:start + self.rows] for k in POLICY_INPUTS if k in batch}
      if self.ref_params is not None:  # the reference policy's log-probs of this micro-batch
        chunk["ref_logp"] = self.logprob_fn(self.ref_params, chunk)
      (loss, metrics), g = self.grad_fn(state.params, chunk)
      grads = g if grads is None else self.add(grads, g)
      del g  # else it lives on beside the next micro-batch's: three gradient copies, not two
      chunk_active = float(np.sum(chunk["kl_weight"] > 0))
      for key, value in {**metrics, "loss": loss}.items():
        if key in TOKEN_MEANS:
          token_means[key] = token_means.get(key, 0.0) + value * chunk_active
        else:
          sums[key] = sums.get(key, 0.0) + value
      active += chunk_active
    state, grad_norm = self.apply(state, grads)
    metrics = {k: float(v) for k, v in jax.device_get(sums).items()}
    metrics.update({k: float(v) / max(active, 1.0)
                    for k, v in jax.device_get(token_means).items()})
    metrics["grad_norm"] = float(grad_norm)
    metrics["micro_batches"] = float(total_rows // self.rows)
    return state, metrics
