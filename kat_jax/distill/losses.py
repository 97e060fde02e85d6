"""Distillation losses (KD, ULD) computed in token chunks, never on whole [B,T,V] logits.

Every loss here is one per-token function of (student logits, teacher distribution) run by
`chunked_token_loss`: it gathers the student hidden state at `student_index`, the teacher's
input at `teacher_index`, then per chunk of tokens applies the LM heads in float32 and the
per-token loss under `jax.checkpoint` inside `lax.scan` (the pattern of
`kat_jax.train.losses.chunked_cross_entropy`). Main-head KD, ULD and the MTP-depth-k variants
differ only in those index and weight arrays.

Teacher inputs come in two forms:
  * online: the teacher's final-normed hidden states [B,T,dt] plus its head [dt,Vt]
    (`TeacherHidden`); its logits exist one chunk at a time, with no gradient;
  * offline: stored top-k log-probabilities and ids [B,T,K] (`TeacherTopK`).

Formulas (docs/spec.md §4): forward KL, temperature `τ² Σ_v p_T^τ (log p_T^τ − log p_S^τ)`
(Hinton et al. 2015); ULD `Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|` with the shorter vocabulary
zero-padded (Boizard et al., arXiv 2402.12030).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kat_jax.train.losses import head_logits, split_chunks

LOSS_KINDS = ("kd", "uld")


@dataclasses.dataclass(frozen=True)
class TeacherHidden:
  """Online teacher: hidden [B,T,dt] (final-normed) and head kernel [dt,Vt]."""
  hidden: jax.Array
  head: jax.Array


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
  """Offline teacher: log-probs [B,T,K] float and ids [B,T,K] int32 of its top-k tokens."""
  logprobs: jax.Array
  ids: jax.Array


# ---------------------------------------------------------------------------
# Per-token losses on [n, V] float32 logits
# ---------------------------------------------------------------------------


def slice_vocab(logits: jax.Array, vocab: int | None) -> jax.Array:
  """Keeps the first `vocab` entries (the tokenizer's real range; the rest is padding rows)."""
  if vocab is None:
    return logits
  if vocab > logits.shape[-1]:
    raise ValueError(f"vocab slice {vocab} is larger than the logits' {logits.shape[-1]}")
  return logits[..., :vocab]


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
  """τ² · KL(p_T^τ ‖ p_S^τ) per token. logits [n,V] (same vocabulary) -> [n] float32."""
  if student_logits.shape[-1] != teacher_logits.shape[-1]:
    raise ValueError(
        f"KD needs one vocabulary: student {student_logits.shape[-1]} vs teacher "
        f"{teacher_logits.shape[-1]} entries; slice both to the shared tokenizer range")
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  return temperature**2 * kl


def forward_kl_topk(student_logits: jax.Array, teacher_logprobs: jax.Array,
                    teacher_ids: jax.Array, temperature: float = 1.0) -> jax.Array:
  """KD against a stored top-k teacher: p_T^τ renormalised over its k ids. -> [n].

  teacher_logprobs [n,K] are the τ=1 log-probs; dividing by τ and renormalising over the k
  kept ids gives the tempered teacher restricted to its support (the usual sparse-KD choice).
  """
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(teacher_logprobs.astype(jnp.float32) / temperature, axis=-1)
  log_ps_k = jnp.take_along_axis(log_ps, teacher_ids.astype(jnp.int32), axis=-1)
  return temperature**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps_k), axis=-1)


def sorted_probs(logits: jax.Array, temperature: float = 1.0,
                 top_k: int | None = None) -> jax.Array:
  """softmax(logits/τ) sorted in descending order, [n,V] -> [n,V] (or [n,top_k]).

  `top_k` keeps only the k largest (jax.lax.top_k); with k >= V it equals the full sort.
  Cost (benchmarks/uld.py, H100, 4096 x 151,665): the forward is no faster than the full sort
  (87.7 vs ~88.5 ms; XLA's top-k at this width falls back to a sort), but the backward is a
  scatter of k entries per token instead of a 152k-entry permutation, so forward+backward
  drops from 302.7 to ~92 ms.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  if top_k is None:
    return -jnp.sort(-probs, axis=-1)
  return jax.lax.top_k(probs, min(top_k, probs.shape[-1]))[0]


def _pad_last(x: jax.Array, size: int) -> jax.Array:
  pad = size - x.shape[-1]
  return x if pad <= 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def uld_from_sorted(student_sorted: jax.Array, teacher_sorted: jax.Array) -> jax.Array:
  """L1 between two descending probability vectors, the shorter zero-padded. -> [n]."""
  size = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
  return jnp.sum(jnp.abs(_pad_last(student_sorted, size) - _pad_last(teacher_sorted, size)),
                 axis=-1)


def uld(student_logits: jax.Array, teacher_logits: jax.Array, *,
        student_temperature: float = 1.0, teacher_temperature: float = 1.0,
        top_k: int | None = None) -> jax.Array:
  """Universal Logit Distillation distance per token; vocabularies may differ. -> [n].

  Exact (`top_k=None`): sort both full probability vectors. Top-k: compare the k largest of
  each and drop the tail, which underestimates the distance by at most the tail masses.
  """
  return uld_from_sorted(sorted_probs(student_logits, student_temperature, top_k),
                         sorted_probs(teacher_logits, teacher_temperature, top_k))


def uld_topk_teacher(student_logits: jax.Array, teacher_logprobs: jax.Array, *,
                     student_temperature: float = 1.0,
                     teacher_temperature: float = 1.0) -> jax.Array:
  """ULD against a stored top-k teacher (its k probabilities, tail dropped). -> [n].

  With τ_T = 1 the stored probabilities are used as they are (not renormalised), so the tail
  the teacher did not store counts as zero, like the top-k ULD variant.
  """
  k = teacher_logprobs.shape[-1]
  lp = teacher_logprobs.astype(jnp.float32)
  if teacher_temperature != 1.0:
    # Tempering needs the full normaliser; over the stored support it is the best we have.
    lp = jax.nn.log_softmax(lp / teacher_temperature, axis=-1)
  teacher_sorted = -jnp.sort(-jnp.exp(lp), axis=-1)
  return uld_from_sorted(sorted_probs(student_logits, student_temperature, k), teacher_sorted)


# ---------------------------------------------------------------------------
# The one chunked driver
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Which per-token loss and its knobs.

  kind: "kd" (forward KL, same tokenizer) or "uld".
  temperature: KD temperature τ (loss scaled by τ²); ULD uses student/teacher_temperature.
  student_vocab / teacher_vocab: slice each head to its tokenizer's real range (None = all).
  uld_top_k: None = exact sort, else top-k ULD.
  """
  kind: str = "kd"
  temperature: float = 1.0
  student_temperature: float = 1.0
  teacher_temperature: float = 1.0
  student_vocab: int | None = None
  teacher_vocab: int | None = None
  uld_top_k: int | None = None

  def __post_init__(self):
    if self.kind not in LOSS_KINDS:
      raise ValueError(f"distillation loss kind {self.kind!r} not in {LOSS_KINDS}")
    for name in ("temperature", "student_temperature", "teacher_temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
    if self.uld_top_k is not None and self.uld_top_k < 1:
      raise ValueError(f"uld_top_k must be >= 1 or None, got {self.uld_top_k}")


def token_loss_on_logits(spec: DistillSpec, student_logits: jax.Array,
                         teacher_logits: jax.Array) -> jax.Array:
  """Per-token loss against dense teacher logits; both sliced per `spec`. -> [n]."""
  s = slice_vocab(student_logits, spec.student_vocab)
  t = slice_vocab(teacher_logits, spec.teacher_vocab)
  if spec.kind == "kd":
    return forward_kl(s, t, spec.temperature)
  return uld(s, t, student_temperature=spec.student_temperature,
             teacher_temperature=spec.teacher_temperature, top_k=spec.uld_top_k)


def token_loss_on_topk(spec: DistillSpec, student_logits: jax.Array, logprobs: jax.Array,
                       ids: jax.Array) -> jax.Array:
  """Per-token loss against a stored top-k teacher. -> [n]."""
  s = slice_vocab(student_logits, spec.student_vocab)
  if spec.kind == "kd":
    return forward_kl_topk(s, logprobs, ids, spec.temperature)
  return uld_topk_teacher(s, logprobs, student_temperature=spec.student_temperature,
                          teacher_temperature=spec.teacher_temperature)


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B,T,...], index [B,T] -> x at index along T, flattened to [B*T, ...]."""
  idx = index.astype(jnp.int32).reshape(index.shape + (1,) * (x.ndim - 2))
  out = jnp.take_along_axis(x, idx, axis=1)
  return out.reshape((-1,) + x.shape[2:])


def chunked_token_loss(per_token: Callable[[jax.Array, Any], jax.Array],
                       student_hidden: jax.Array, student_head: jax.Array,
                       student_index: jax.Array, teacher_inputs: Any,
                       teacher_index: jax.Array, weights: jax.Array, *,
                       chunk_size: int = 1024) -> jax.Array:
  """Σ_t weights[t] · per_token(student logits at student_index[t], teacher at teacher_index[t]).

  Args:
    per_token: (student_logits [n,Vs] float32, teacher chunk pytree of [n,...]) -> [n].
    student_hidden: [B,T,d]; student_head: [d,Vs].
    student_index, teacher_index: [B,T] int32 positions to read each side from.
    teacher_inputs: pytree of [B,T,...] arrays (gathered at teacher_index, no gradient).
    weights: [B,T] float32.
    chunk_size: tokens per chunk (only one chunk of [n,V] float32 logits lives at a time).

  Returns:
    The weighted sum (float32 scalar); differentiable w.r.t. the student only.
  """
  if student_index.shape != weights.shape or teacher_index.shape != weights.shape:
    raise ValueError(f"index/weights shapes differ: {student_index.shape}, "
                     f"{teacher_index.shape}, {weights.shape}")
  s_hidden = _gather_rows(student_hidden, student_index)
  t_inputs = jax.tree.map(lambda x: _gather_rows(jax.lax.stop_gradient(x), teacher_index),
                          teacher_inputs)
  flat_w = weights.reshape(-1).astype(jnp.float32)
  chunk = min(chunk_size, flat_w.shape[0])
  xs = (split_chunks(s_hidden, chunk), jax.tree.map(lambda x: split_chunks(x, chunk), t_inputs),
        split_chunks(flat_w, chunk))

  @jax.checkpoint
  def chunk_loss(h, t, w):
    logits = head_logits(h, student_head)
    # where(): a zero weight must also stop NaN/inf from padding tokens.
    return jnp.sum(jnp.where(w > 0, w * per_token(logits, t), 0.0))

  def body(total, x):
    return total + chunk_loss(*x), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return total


def distill_loss(spec: DistillSpec, student_hidden: jax.Array, student_head: jax.Array,
                 student_index: jax.Array, teacher: TeacherHidden | TeacherTopK,
                 teacher_index: jax.Array, weights: jax.Array, *,
                 chunk_size: int = 1024) -> jax.Array:
  """Summed KD/ULD loss of student positions vs teacher positions (see `chunked_token_loss`)."""
  if isinstance(teacher, TeacherHidden):
    head = jax.lax.stop_gradient(teacher.head)

    def per_token(s_logits, t_hidden):
      t_logits = jnp.einsum("nd,dv->nv", t_hidden, head.astype(t_hidden.dtype),
                            preferred_element_type=jnp.float32)
      return token_loss_on_logits(spec, s_logits, t_logits)
    inputs = teacher.hidden
  elif isinstance(teacher, TeacherTopK):
    def per_token(s_logits, t):
      return token_loss_on_topk(spec, s_logits, t[0], t[1])
    inputs = (teacher.logprobs, teacher.ids)
  else:
    raise ValueError(f"teacher must be TeacherHidden or TeacherTopK, got {type(teacher)}")
  return chunked_token_loss(per_token, student_hidden, student_head, student_index, inputs,
                            teacher_index, weights, chunk_size=chunk_size)


def topk_logprobs(logits: jax.Array, k: int, vocab: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(log-probs [n,k] float32, ids [n,k] int32) of the k most likely tokens, best first."""
  log_p = jax.nn.log_softmax(slice_vocab(logits, vocab).astype(jnp.float32), axis=-1)
  values, ids = jax.lax.top_k(log_p, k)
  return values, ids.astype(jnp.int32)
