"""Cross-tokenizer ULD: a byte-tokenizer student and a Qwen2.5-tokenizer teacher on the same
records, packed side by side, answer spans aligned by index."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data import packing
from kat_jax.data.packing import validate_batch
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.distill import cross_tokenizer
from kat_jax.distill.dual_regime import dual_regime_document as render_document
from kat_jax.distill.dual_regime import generate_records  # AutoThink tasks, stage-1 render
from kat_jax.distill.losses import DistillSpec, TeacherHidden, distill_loss, uld
from kat_jax.distill.objective import Objective, make_loss_fn
from kat_jax.model import Decoder, get_preset, init_params, lm_head_kernel
from kat_jax.model.mtp import MTPHeads, init_mtp_params
from kat_jax.testing import relative_error

BYTES, QWEN = get_tokenizer("bytes"), get_tokenizer("qwen2.5")
STUDENT_TOK, TEACHER_TOK = BYTES, QWEN
ROW_LEN = {"bytes": 320, "qwen": 160}  # two or more documents per row either way
S_LEN, T_LEN = ROW_LEN["bytes"], ROW_LEN["qwen"]


def _pairs(num: int, seed: int = 0, student=BYTES, teacher=QWEN):
  records = generate_records(num, seed)
  return [(render_document(r, student), render_document(r, teacher)) for r in records]


def _batch(pairs, batch_size=2, skip_student_eos=True, student=BYTES, teacher=QWEN):
  skip = student.eos_id if skip_student_eos else None
  s_len, t_len = (ROW_LEN["bytes" if tok is BYTES else "qwen"] for tok in (student, teacher))
  return next(cross_tokenizer.pair_batches(
      pairs, batch_size, s_len, t_len, student_pad=student.pad_id,
      teacher_pad=teacher.pad_id, student_skip_id=skip))


def _aligned_from_rows(batch, b, skip_eos, eos=BYTES.eos_id):
  """[(student target pos, teacher target pos, weight)] from the packed rows alone."""
  out = []
  for seg in range(1, int(batch["segment_ids"][b].max()) + 1):
    s = np.flatnonzero((batch["segment_ids"][b] == seg) & (batch["weights"][b] > 0))
    if skip_eos:
      s = s[batch["tokens"][b, s] != eos]
    t = np.flatnonzero((batch["teacher_segment_ids"][b] == seg)
                       & (batch["teacher_weights"][b] > 0))
    n = min(len(s), len(t))
    out += [(int(i), int(j), float(batch["weights"][b, i])) for i, j in zip(s[:n], t[:n])]
  return out


@pytest.mark.parametrize("skip_eos", [True, False])
@pytest.mark.parametrize("student,teacher", [(BYTES, QWEN), (QWEN, BYTES)])
def test_pair_rows_align_answer_spans_by_index(skip_eos, student, teacher):
  pairs = _pairs(6, student=student, teacher=teacher)
  assert all(len(s) != len(t) for s, t in pairs)  # the two tokenizations really differ
  batch = _batch(pairs, skip_student_eos=skip_eos, student=student, teacher=teacher)
  validate_batch({k: batch[k] for k in ("tokens", "positions", "kv_end", "pred_index",
                                        "weights", "segment_ids")})
  validate_batch({k: batch[f"teacher_{k}"] for k in ("tokens", "positions", "kv_end",
                                                     "pred_index", "weights", "segment_ids")})
  assert int(batch["segment_ids"][0].max()) >= 2  # packed: several documents per row
  for b in range(2):
    expected = _aligned_from_rows(batch, b, skip_eos, student.eos_id)
    got = np.flatnonzero(batch["distill_weights"][b] > 0)
    assert [i for i, _, _ in expected] == list(got)
    for i, j, w in expected:
      assert batch["distill_teacher_index"][b, i] == j - 1  # the teacher predicts j from j-1
      assert batch["distill_weights"][b, i] == w
    eos_kept = np.any(batch["tokens"][b, got] == student.eos_id)
    if skip_eos:
      assert not eos_kept
    elif student is QWEN:  # Qwen's answer span is the shorter one: its EOS gets aligned
      assert eos_kept
  # The first aligned pair is the first answer token on both sides: the same text starts.
  s0 = int(np.flatnonzero(batch["distill_weights"][0] > 0)[0])
  t0 = int(batch["distill_teacher_index"][0, s0]) + 1
  a = student.decode([int(batch["tokens"][0, s0])])
  b = teacher.decode([int(batch["teacher_tokens"][0, t0])])
  assert a.startswith(b) or b.startswith(a)


def test_truncation_and_bad_lengths():
  (s, t), = _pairs(1)
  row = next(cross_tokenizer.pack_pairs([(s, t)], 20, 12, student_pad=0, teacher_pad=0))
  n = int(np.sum(row["distill_weights"] > 0))
  s_ans = cross_tokenizer.answer_positions(s.slice(0, 20))
  t_ans = cross_tokenizer.answer_positions(t.slice(0, 12))
  assert n == min(len(s_ans), len(t_ans))
  with pytest.raises(ValueError, match="row lengths"):
    next(cross_tokenizer.pack_pairs([(s, t)], 0, 12, student_pad=0, teacher_pad=0))


def test_chunked_uld_with_alignment_matches_per_pair_reference():
  pairs = _pairs(6, seed=1)
  batch = _batch(pairs)
  ks = jax.random.split(jax.random.key(0), 4)
  s_hidden = jax.random.normal(ks[0], (2, S_LEN, 8))
  s_head = jax.random.normal(ks[1], (8, 30))
  t_hidden = jax.random.normal(ks[2], (2, T_LEN, 12))
  t_head = 2.0 * jax.random.normal(ks[3], (12, 50))  # a different vocabulary size
  got = distill_loss(DistillSpec("uld"), s_hidden, s_head, jnp.asarray(batch["pred_index"]),
                     TeacherHidden(t_hidden, t_head),
                     jnp.asarray(batch["distill_teacher_index"]),
                     jnp.asarray(batch["distill_weights"]), chunk_size=64)
  expected = 0.0
  for b in range(2):
    for i, j, w in _aligned_from_rows(batch, b, True):
      expected += w * float(uld((s_hidden[b, i - 1] @ s_head)[None],
                                (t_hidden[b, j - 1] @ t_head)[None])[0])
  assert expected > 0 and relative_error(got, expected) < 1e-5


@functools.partial(jax.jit, static_argnums=0)
def _init(config, rng):
  return init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(config, params, rows):
  return Decoder(config).apply({"params": params}, rows["tokens"], rows["positions"],
                               rows["kv_end"], return_hidden=True)


def _own_rows(docs, length, pad):
  """Each document alone in its own padded row (position 0, causal within itself)."""
  return packing.stack_rows([packing.flat_example_to_row(d.tokens, length, pad) for d in docs])


def test_online_objective_runs_the_teacher_on_its_own_tokens():
  """Main-head and MTP-depth-1 ULD of a cross-tokenizer batch vs each document alone."""
  pairs = _pairs(4, seed=2)
  batch = _batch(pairs, batch_size=1)
  # Re-index the Qwen ids that occur to 0..n-1 (a bijection, so still the teacher's own
  # tokenization) to keep the tiny teacher's embedding and CPU compile small.
  used = np.unique(np.concatenate([t.tokens for _, t in pairs] + [batch["teacher_tokens"][0]]))
  compact = lambda x: np.searchsorted(used, x).astype(np.int32)
  batch["teacher_tokens"] = compact(batch["teacher_tokens"])
  pairs = [(s, packing.Document(compact(t.tokens), t.loss_mask)) for s, t in pairs]
  student = get_preset("tiny", num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2,
                       num_kv_heads=1, vocab_size=STUDENT_TOK.vocab_size)
  teacher = get_preset("tiny", num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2,
                       num_kv_heads=1, vocab_size=len(used))
  params = dict(_init(student, jax.random.key(0)))
  params["mtp"] = init_mtp_params(student, 1, jax.random.key(1))
  teacher_params = _init(teacher, jax.random.key(2))
  objective = Objective(distill_weight=1.0, spec=DistillSpec("uld"), teacher="online",
                        mtp_depth=1, mtp_distill_weight=1.0, eos_id=STUDENT_TOK.eos_id,
                        loss_chunk=64)
  _, aux = jax.jit(make_loss_fn(student, teacher, objective))(
      params, teacher_params, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.float32(1))

  num_docs = int(batch["segment_ids"][0].max())
  pairs = pairs[:num_docs]
  s_rows, t_rows = _own_rows([s for s, _ in pairs], S_LEN, 0), _own_rows([t for _, t in pairs],
                                                                          T_LEN, 0)
  dec = {k: v for k, v in params.items() if k != "mtp"}
  head, t_head = lm_head_kernel(dec, student), lm_head_kernel(teacher_params, teacher)
  h = _hidden(student, dec, s_rows)
  mtp1 = jax.jit(lambda p, h: MTPHeads(student, 1).apply(
      {"params": p}, h, s_rows["tokens"], dec["embed"]["embedding"], s_rows["positions"],
      s_rows["kv_end"])[0])(params["mtp"], h)
  t_logits = np.asarray(_hidden(teacher, teacher_params, t_rows) @ t_head)
  s_logits, m_logits = np.asarray(h @ head), np.asarray(mtp1 @ head)
  main_s, mtp_s, teach, w, mtp_t, mtp_w = [], [], [], [], [], []
  for d, (student_doc, teacher_doc) in enumerate(pairs):
    s_pos, t_pos = cross_tokenizer.align_answer_spans(student_doc, teacher_doc,
                                                      student_skip_id=STUDENT_TOK.eos_id)
    for i, j in zip(s_pos, t_pos):
      main_s.append(s_logits[d, i - 1])
      teach.append(t_logits[d, j - 1])
      w.append(student_doc.loss_mask[i])
      if i >= 2:  # depth 1 at i-2 predicts token i
        mtp_s.append(m_logits[d, i - 2])
        mtp_t.append(t_logits[d, j - 1])
        mtp_w.append(student_doc.loss_mask[i])
  main = float(np.dot(w, uld(np.stack(main_s), np.stack(teach))))
  depth1 = float(np.dot(mtp_w, uld(np.stack(mtp_s), np.stack(mtp_t))))
  assert main > 0 and depth1 > 0
  assert relative_error(aux["distill_sum"], main) < 1e-4
  assert relative_error(aux["mtp1_distill_sum"], depth1) < 1e-4
