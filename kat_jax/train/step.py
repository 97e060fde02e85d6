"""The pretrain/SFT train step: a pure `(state, batch) -> (state, metrics)` function.

A batch follows the packed-row contract (kat_jax.data.packing): `tokens`, `positions`,
`kv_end`, `pred_index`, `weights`, each [B, T]. Gradient accumulation splits B into
`grad_accum` micro-batches inside the step (one `lax.scan`), and the loss is the weighted
token mean over the whole batch, so accumulation never changes the update.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kat_jax.model import Decoder, ModelConfig, lm_head_kernel
from kat_jax.train.losses import chunked_cross_entropy
from kat_jax.train.state import TrainState

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("tokens", "positions", "kv_end", "pred_index", "weights")


def make_loss_fn(config: ModelConfig, *, loss_chunk: int = 1024, z_loss: float = 0.0
                 ) -> Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]:
  """(params, batch) -> (summed weighted loss, aux sums) for next-token prediction."""
  model = Decoder(config)

  def loss_fn(params, batch: Batch):
    hidden = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["kv_end"], return_hidden=True)
    return chunked_cross_entropy(hidden, lm_head_kernel(params, config), batch["tokens"],
                                 batch["pred_index"], batch["weights"],
                                 chunk_size=loss_chunk, z_loss=z_loss)

  return loss_fn


def _split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
  size = batch["tokens"].shape[0]
  if size % grad_accum:
    raise ValueError(f"batch size {size} is not divisible by grad_accum {grad_accum}")
  return jax.tree.map(lambda x: x.reshape((grad_accum, size // grad_accum) + x.shape[1:]), batch)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, loss_chunk: int = 1024, z_loss: float = 0.0,
                    schedule: optax.Schedule | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the (un-jitted) train step; the caller jits it with its shardings."""
  loss_fn = make_loss_fn(config, loss_chunk=loss_chunk, z_loss=z_loss)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch):
    batch = {k: batch[k] for k in MODEL_INPUTS}
    micro = _split_micro_batches(batch, grad_accum)

    def accumulate(carry, micro_batch):
      grads, aux = carry
      g, a = grad_fn(state.params, micro_batch)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, aux, a)), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    zero_aux = {k: jnp.zeros((), jnp.float32) for k in ("ce_sum", "correct_sum", "weight_sum")}
    (grads, aux), _ = jax.lax.scan(accumulate, (zero_grads, zero_aux), micro)
    denom = jnp.maximum(aux["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": aux["ce_sum"] / denom,
        "accuracy": aux["correct_sum"] / denom,
        "loss_tokens": aux["weight_sum"],
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(config: ModelConfig, *, loss_chunk: int = 1024
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """(params, batch) -> weighted sums {ce_sum, correct_sum, weight_sum} for held-out loss."""
  loss_fn = make_loss_fn(config, loss_chunk=loss_chunk)

  def eval_step(params, batch: Batch):
    _, aux = loss_fn(params, {k: batch[k] for k in MODEL_INPUTS})
    return aux

  return eval_step
