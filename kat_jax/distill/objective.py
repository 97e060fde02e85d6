"""The distillation objective and its pure train step.

    loss = ce_weight · CE(main) + distill_weight · D(main)
         + λ(step)/D · Σ_k [ mtp_ce_weight · CE_k + mtp_distill_weight · D_k ]

all summed over tokens and divided by the main head's total loss weight (as in
`kat_jax.train.step`, so gradient accumulation never changes the update). `D` is forward KL
("kd") or ULD ("uld") against an online teacher (second model, frozen) or stored top-k
log-probs. Depth k of the MTP heads at position i predicts t_{i+k+1}; its teacher is the
teacher's next-token distribution at i+k, which predicts the same token (KAT report §3.1:
"supervision flows from the teacher's sequential logits to the student's MTP modules").

Params of the student: the decoder tree plus, when MTP is on, a top-level "mtp" key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kat_jax.distill.losses import (DistillSpec, TeacherHidden, TeacherTopK, distill_loss)
from kat_jax.model import Decoder, ModelConfig, lm_head_kernel
from kat_jax.model.mtp import MTPHeads, chain_valid, mtp_targets, shift_left, split_mtp
from kat_jax.train.losses import chunked_cross_entropy
from kat_jax.train.state import TrainState

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("tokens", "positions", "kv_end", "pred_index", "weights")
TEACHER_KEYS = ("teacher_logprobs", "teacher_ids")
# Cross-tokenizer batches (`kat_jax.distill.cross_tokenizer`): the teacher's own row and the
# answer-span alignment, both indexed at the student's target positions.
CROSS_KEYS = ("teacher_tokens", "teacher_positions", "teacher_kv_end", "distill_teacher_index",
              "distill_weights")
TEACHER_MODES = ("none", "online", "offline")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the student is trained on (see the module docstring)."""
  ce_weight: float = 1.0
  distill_weight: float = 0.0
  spec: DistillSpec = DistillSpec()
  teacher: str = "none"  # none | online | offline
  mtp_depth: int = 0
  mtp_ce_weight: float = 1.0
  mtp_distill_weight: float = 0.0
  mtp_lambda: tuple[float, ...] = (0.3,)  # piecewise constant values ...
  mtp_lambda_boundaries: tuple[int, ...] = ()  # ... switching at these steps
  skip_student_eos: bool = True  # ULD: drop positions whose target is EOS (docs/spec.md §4.1)
  eos_id: int = -1
  loss_chunk: int = 1024

  def __post_init__(self):
    if self.teacher not in TEACHER_MODES:
      raise ValueError(f"teacher {self.teacher!r} not in {TEACHER_MODES}")
    if self.mtp_depth < 0:
      raise ValueError(f"mtp_depth must be >= 0, got {self.mtp_depth}")
    if len(self.mtp_lambda) != len(self.mtp_lambda_boundaries) + 1:
      raise ValueError(f"mtp_lambda needs one more value than boundaries: "
                       f"{self.mtp_lambda} vs {self.mtp_lambda_boundaries}")
    if list(self.mtp_lambda_boundaries) != sorted(self.mtp_lambda_boundaries):
      raise ValueError(f"mtp_lambda_boundaries must increase: {self.mtp_lambda_boundaries}")
    uses_teacher = self.distill_weight > 0 or (self.mtp_depth and self.mtp_distill_weight > 0)
    if uses_teacher and self.teacher == "none":
      raise ValueError("a distillation weight is > 0 but teacher is 'none'")

  @property
  def needs_teacher(self) -> bool:
    return self.teacher != "none" and (
        self.distill_weight > 0 or (self.mtp_depth > 0 and self.mtp_distill_weight > 0))


def mtp_lambda_at(objective: Objective, step: jax.Array) -> jax.Array:
  """Piecewise-constant λ (e.g. DeepSeek-V3's 0.3 then 0.1) at optimizer step `step`."""
  values = jnp.asarray(objective.mtp_lambda, jnp.float32)
  bounds = jnp.asarray(objective.mtp_lambda_boundaries, jnp.int32)
  return values[jnp.sum(step >= bounds)] if bounds.size else values[0]


def _distill_weights(objective: Objective, tokens: jax.Array, weights: jax.Array) -> jax.Array:
  if objective.spec.kind == "uld" and objective.skip_student_eos and objective.eos_id >= 0:
    return jnp.where(tokens == objective.eos_id, 0.0, weights)
  return weights


def is_cross_tokenizer(batch: Batch) -> bool:
  """True for batches built by `cross_tokenizer` (teacher row + alignment present)."""
  present = [k in batch for k in CROSS_KEYS]
  if any(present) and not all(present):
    raise ValueError(f"cross-tokenizer batch lacks {[k for k in CROSS_KEYS if k not in batch]}")
  return all(present)


def distill_alignment(objective: Objective, batch: Batch, weights: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
  """(teacher index, distillation weight), both [B,T] at the student's target positions.

  Target p (predicted by the student from pred_index[p]) is matched to the teacher's
  next-token distribution at teacher_index[p]. Same tokenizer: teacher_index = pred_index and
  the weight is the CE weight (student EOS targets dropped for ULD); cross-tokenizer: the
  batch's answer-span alignment (`distill_teacher_index`, `distill_weights`).
  """
  if is_cross_tokenizer(batch):
    return batch["distill_teacher_index"], batch["distill_weights"].astype(jnp.float32)
  return batch["pred_index"], _distill_weights(objective, batch["tokens"], weights)


def make_loss_fn(student: ModelConfig, teacher: ModelConfig | None, objective: Objective
                 ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """(params, teacher_params, batch, mtp_lambda) -> (summed loss, aux sums)."""
  model = Decoder(student)
  teacher_model = Decoder(teacher) if teacher is not None else None
  mtp = MTPHeads(student, objective.mtp_depth) if objective.mtp_depth else None
  chunk = objective.loss_chunk

  def teacher_source(teacher_params, batch):
    if objective.teacher == "online":
      if teacher_model is None:
        raise ValueError("online teacher needs the teacher's ModelConfig")
      # A cross-tokenizer batch carries the teacher's own tokenization of the same documents.
      pre = "teacher_" if is_cross_tokenizer(batch) else ""
      hidden = teacher_model.apply({"params": teacher_params}, batch[pre + "tokens"],
                                   batch[pre + "positions"], batch[pre + "kv_end"],
                                   return_hidden=True)
      return TeacherHidden(jax.lax.stop_gradient(hidden),
                           jax.lax.stop_gradient(lm_head_kernel(teacher_params, teacher)))
    missing = [k for k in TEACHER_KEYS if k not in batch]
    if is_cross_tokenizer(batch):
      raise ValueError("offline teacher top-k is stored per student token; a cross-tokenizer "
                       "batch needs teacher='online'")
    if missing:
      raise ValueError(f"offline teacher: batch lacks {missing}")
    return TeacherTopK(batch["teacher_logprobs"], batch["teacher_ids"])

  def loss_fn(params, teacher_params, batch: Batch, mtp_lambda: jax.Array):
    decoder_params, mtp_params = split_mtp(params)
    tokens, kv_end, pred = batch["tokens"], batch["kv_end"], batch["pred_index"]
    weights = batch["weights"].astype(jnp.float32)
    hidden = model.apply({"params": decoder_params}, tokens, batch["positions"], kv_end,
                         return_hidden=True)
    head = lm_head_kernel(decoder_params, student)
    ce, aux = chunked_cross_entropy(hidden, head, tokens, pred, weights, chunk_size=chunk)
    total = objective.ce_weight * ce
    aux = dict(aux)
    source = teacher_source(teacher_params, batch) if objective.needs_teacher else None
    teacher_index, distill_w = distill_alignment(objective, batch, weights)
    if source is not None and objective.distill_weight > 0:
      d = distill_loss(objective.spec, hidden, head, pred, source, teacher_index, distill_w,
                       chunk_size=chunk)
      total += objective.distill_weight * d
      aux["distill_sum"] = d
    if mtp is not None:
      if mtp_params is None:
        raise ValueError(f"mtp_depth={objective.mtp_depth} but params have no 'mtp' key")
      total += _mtp_terms(mtp, mtp_params, decoder_params, head, hidden, batch, weights,
                          source, (teacher_index, distill_w), objective, mtp_lambda, aux)
    return total, aux

  return loss_fn


def _mtp_terms(mtp, mtp_params, decoder_params, head, hidden, batch, weights, source,
               alignment, objective: Objective, mtp_lambda, aux) -> jax.Array:
  """(λ/D) Σ_k of the depth-k CE (+ distillation) sums; fills aux with per-depth sums.

  Depth k at i predicts the target at p = i+k+1, so it reads the alignment at p: teacher
  index (= i+k for one tokenizer, the teacher's next-token distribution of the same token)
  and distillation weight, kept only where i..p is one path (`chain_valid`).
  """
  teacher_index, distill_w = alignment
  tokens, kv_end = batch["tokens"], batch["kv_end"]
  outs = mtp.apply({"params": mtp_params}, hidden, tokens, decoder_params["embed"]["embedding"],
                   batch["positions"], kv_end)
  b, t = tokens.shape
  here = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  total = jnp.zeros((), jnp.float32)
  for k, h_k in enumerate(outs, start=1):
    targets, w_k = mtp_targets(tokens, weights, kv_end, k)
    ce_k, aux_k = chunked_cross_entropy(h_k, head, targets, here, w_k,
                                        chunk_size=objective.loss_chunk)
    term = objective.mtp_ce_weight * ce_k
    aux[f"mtp{k}_ce_sum"] = aux_k["ce_sum"]
    aux[f"mtp{k}_correct_sum"] = aux_k["correct_sum"]
    aux[f"mtp{k}_weight_sum"] = aux_k["weight_sum"]
    if source is not None and objective.mtp_distill_weight > 0:
      teacher_at = shift_left(teacher_index, k + 1, 0)
      d_w = jnp.where(chain_valid(kv_end, k + 1), shift_left(distill_w, k + 1, 0.0), 0.0)
      d_k = distill_loss(objective.spec, h_k, head, here, source, teacher_at, d_w,
                         chunk_size=objective.loss_chunk)
      term += objective.mtp_distill_weight * d_k
      aux[f"mtp{k}_distill_sum"] = d_k
    total += term
  return mtp_lambda / len(outs) * total


def _split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
  size = batch["tokens"].shape[0]
  if size % grad_accum:
    raise ValueError(f"batch size {size} is not divisible by grad_accum {grad_accum}")
  return jax.tree.map(lambda x: x.reshape((grad_accum, size // grad_accum) + x.shape[1:]), batch)


def _aux_template(loss_fn, params, teacher_params, batch) -> dict[str, jax.Array]:
  shapes = jax.eval_shape(lambda: loss_fn(params, teacher_params, batch, jnp.float32(0))[1])
  return {k: jnp.zeros((), jnp.float32) for k in shapes}


def _batch_inputs(batch: Batch, objective: Objective) -> Batch:
  keys = MODEL_INPUTS + (TEACHER_KEYS if objective.teacher == "offline" else ())
  keys += CROSS_KEYS if is_cross_tokenizer(batch) else ()
  return {k: batch[k] for k in keys}


def make_distill_step(student: ModelConfig, teacher: ModelConfig | None, objective: Objective,
                      optimizer: optax.GradientTransformation, *, grad_accum: int = 1,
                      schedule: optax.Schedule | None = None
                      ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict]]:
  """(state, teacher_params, batch) -> (state, metrics). Teacher params get no gradient."""
  loss_fn = make_loss_fn(student, teacher, objective)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, teacher_params, batch: Batch):
    batch = _batch_inputs(batch, objective)
    micro = _split_micro_batches(batch, grad_accum)
    lam = mtp_lambda_at(objective, state.step)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_aux = _aux_template(loss_fn, state.params, teacher_params, first)

    def accumulate(carry, micro_batch):
      grads, aux = carry
      g, a = grad_fn(state.params, teacher_params, micro_batch, lam)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, aux, a)), None

    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, aux), _ = jax.lax.scan(accumulate, (zero_grads, zero_aux), micro)
    denom = jnp.maximum(aux["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = summarize(aux)
    metrics.update(grad_norm=optax.tree.norm(grads), mtp_lambda=lam)
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def summarize(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Aux sums -> means: loss (main CE), accuracy, distill, mtp{k}_loss/_accuracy/_distill."""
  denom = jnp.maximum(aux["weight_sum"], 1.0)
  out = {"loss": aux["ce_sum"] / denom, "accuracy": aux["correct_sum"] / denom,
         "loss_tokens": aux["weight_sum"]}
  if "distill_sum" in aux:
    out["distill"] = aux["distill_sum"] / denom
  k = 1
  while f"mtp{k}_ce_sum" in aux:
    d_k = jnp.maximum(aux[f"mtp{k}_weight_sum"], 1.0)
    out[f"mtp{k}_loss"] = aux[f"mtp{k}_ce_sum"] / d_k
    out[f"mtp{k}_accuracy"] = aux[f"mtp{k}_correct_sum"] / d_k
    if f"mtp{k}_distill_sum" in aux:
      out[f"mtp{k}_distill"] = aux[f"mtp{k}_distill_sum"] / d_k
    k += 1
  return out


def make_distill_eval_step(student: ModelConfig, mtp_depth: int = 0, *, loss_chunk: int = 1024
                           ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """(params, batch) -> held-out sums {ce_sum, correct_sum, weight_sum, mtp{k}_...}."""
  loss_fn = make_loss_fn(student, None, Objective(mtp_depth=mtp_depth, loss_chunk=loss_chunk))

  def eval_step(params, batch: Batch):
    _, aux = loss_fn(params, None, {k: batch[k] for k in MODEL_INPUTS}, jnp.float32(1.0))
    return aux

  return eval_step
