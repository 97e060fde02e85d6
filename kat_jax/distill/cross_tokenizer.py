"""Cross-tokenizer ULD batches: one record rendered by the student's and the teacher's
tokenizers, packed side by side, answer spans aligned by index.

ULD (Boizard et al., arXiv 2402.12030; docs/spec.md §4.1) aligns two tokenizations of an answer
by index, not by text offset: the i-th answer token of the student is matched to the i-th
answer token of the teacher, over the first min(len_S, len_T) answer tokens; the student's EOS
is left out of its span (`skip_student_eos`), the teacher's optionally.

Answer span of a document = its trained positions (loss_mask > 0; the first token never is).
For the student target at row position p (predicted from `pred_index[p]` = p-1), the row
stores `distill_teacher_index[p]` = the teacher row position whose next-token distribution
predicts the aligned teacher token, and `distill_weights[p]` = the student's weight there
(0 where nothing is aligned). So the chunked loss runs with

    student_index = pred_index, teacher_index = distill_teacher_index, weights = distill_weights

and MTP depth k at i (target p = i+k+1) reads the same arrays at p (`kat_jax.distill.objective`).

Row keys: the student's packed row (`packing.layout_row`: tokens, positions, kv_end, pred_index,
weights, segment_ids), the teacher's row of the same documents in the same order with each key
prefixed `teacher_` (its own length), and `distill_teacher_index` [T_s] int32,
`distill_weights` [T_s] float32.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from kat_jax.data import packing
from kat_jax.data.packing import Document

TEACHER_ROW_KEYS = tuple(f"teacher_{k}" for k in packing.BATCH_KEYS)
ALIGN_KEYS = ("distill_teacher_index", "distill_weights")
Pair = tuple[Document, Document]  # (student document, teacher document)


def answer_positions(doc: Document, skip_id: int | None = None) -> np.ndarray:
  """[n] int positions of the document's answer tokens (loss_mask > 0, position >= 1),
  leaving out tokens equal to `skip_id` (e.g. the student's EOS)."""
  mask = np.ones(len(doc), bool) if doc.loss_mask is None else doc.loss_mask > 0
  mask[:1] = False  # nothing predicts the first token
  if skip_id is not None:
    mask &= doc.tokens != skip_id
  return np.flatnonzero(mask).astype(np.int32)


def align_answer_spans(student: Document, teacher: Document, *,
                       student_skip_id: int | None = None,
                       teacher_skip_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(student positions [n], teacher positions [n]) of the answer tokens paired by index,
  n = min(answer lengths). Positions are the aligned *targets* within each document."""
  s = answer_positions(student, student_skip_id)
  t = answer_positions(teacher, teacher_skip_id)
  n = min(len(s), len(t))
  return s[:n], t[:n]


def layout_pair_row(pairs: Sequence[Pair], student_len: int, teacher_len: int, *,
                    student_pad: int, teacher_pad: int, student_skip_id: int | None = None,
                    teacher_skip_id: int | None = None) -> dict[str, np.ndarray]:
  """One packed row of (student, teacher) document pairs (see the module docstring)."""
  row = packing.layout_row([s for s, _ in pairs], student_len, student_pad)
  teacher_row = packing.layout_row([t for _, t in pairs], teacher_len, teacher_pad)
  row.update({f"teacher_{k}": v for k, v in teacher_row.items()})
  teacher_index = np.zeros(student_len, np.int32)
  weights = np.zeros(student_len, np.float32)
  s_off = t_off = 0
  for student, teacher in pairs:
    s_pos, t_pos = align_answer_spans(student, teacher, student_skip_id=student_skip_id,
                                      teacher_skip_id=teacher_skip_id)
    teacher_index[s_off + s_pos] = t_off + t_pos - 1  # the teacher predicts t_pos from t_pos-1
    weights[s_off + s_pos] = row["weights"][s_off + s_pos]
    s_off, t_off = s_off + len(student), t_off + len(teacher)
  row["distill_teacher_index"], row["distill_weights"] = teacher_index, weights
  return row


def pack_pairs(pairs: Iterable[Pair], student_len: int, teacher_len: int, *,
               student_pad: int, teacher_pad: int, student_skip_id: int | None = None,
               teacher_skip_id: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Greedy packing of document pairs: a pair joins the current row iff both documents fit.

  A document longer than its row is truncated to the row (splitting would cut the two
  tokenizations at different places of the text); the alignment uses what is left.
  """
  if student_len < 1 or teacher_len < 1:
    raise ValueError(f"row lengths must be >= 1, got {student_len}, {teacher_len}")
  kw = dict(student_pad=student_pad, teacher_pad=teacher_pad,
            student_skip_id=student_skip_id, teacher_skip_id=teacher_skip_id)
  current: list[Pair] = []
  s_used = t_used = 0
  for student, teacher in pairs:
    student, teacher = student.slice(0, student_len), teacher.slice(0, teacher_len)
    if current and (s_used + len(student) > student_len or t_used + len(teacher) > teacher_len):
      yield layout_pair_row(current, student_len, teacher_len, **kw)
      current, s_used, t_used = [], 0, 0
    current.append((student, teacher))
    s_used, t_used = s_used + len(student), t_used + len(teacher)
  if current:
    yield layout_pair_row(current, student_len, teacher_len, **kw)


def pair_batches(pairs: Iterable[Pair], batch_size: int, student_len: int, teacher_len: int,
                 **kw) -> Iterator[dict[str, np.ndarray]]:
  """Batches [B, ...] of `pack_pairs` rows; the last one is padded with empty rows."""
  rows: list[dict[str, np.ndarray]] = []
  for row in pack_pairs(pairs, student_len, teacher_len, **kw):
    rows.append(row)
    if len(rows) == batch_size:
      yield packing.stack_rows(rows)
      rows = []
  if rows:
    empty = layout_pair_row([], student_len, teacher_len, student_pad=kw["student_pad"],
                            teacher_pad=kw["teacher_pad"])
    yield packing.stack_rows(rows + [empty] * (batch_size - len(rows)))
