"""Tests for kat_jax.data.packing: the batch contract of packed documents."""

from __future__ import annotations

import numpy as np
import pytest

from kat_jax.data import packing
from kat_jax.data.packing import Document
from kat_jax.kernels import reference

PAD = 0


def _random_docs(rng: np.random.Generator, num_docs: int, max_len: int,
                 with_masks: bool = False) -> list[Document]:
  docs = []
  for _ in range(num_docs):
    length = int(rng.integers(1, max_len + 1))
    tokens = rng.integers(1, 50, size=length)
    mask = rng.integers(0, 2, size=length) if with_masks and rng.random() < 0.5 else None
    docs.append(Document(tokens, mask))
  return docs


def _segments(row: dict[str, np.ndarray]) -> list[np.ndarray]:
  """Token arrays of each document of a row, in order."""
  seg = row["segment_ids"]
  return [row["tokens"][seg == s] for s in range(1, seg.max() + 1)]


def test_flat_example_to_row_matches_hand_written_layout():
  row = packing.flat_example_to_row(np.array([7, 8, 9]), seq_len=5, pad_id=PAD,
                                    loss_mask=np.array([1, 0, 1]))
  np.testing.assert_array_equal(row["tokens"], [7, 8, 9, PAD, PAD])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 0])
  np.testing.assert_array_equal(row["kv_end"], [3, 3, 3, 4, 5])
  np.testing.assert_array_equal(row["pred_index"], [0, 0, 1, 3, 4])
  np.testing.assert_array_equal(row["weights"], [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0])
  assert {k: v.dtype for k, v in row.items()} == {
      "tokens": np.int32, "positions": np.int32, "kv_end": np.int32,
      "pred_index": np.int32, "weights": np.float32, "segment_ids": np.int32}
  packing.validate_batch(row)


def test_layout_row_of_two_documents_hand_written():
  row = packing.layout_row([Document([5, 6]), Document([7, 8, 9])], seq_len=6, pad_id=PAD)
  np.testing.assert_array_equal(row["positions"], [0, 1, 0, 1, 2, 0])
  np.testing.assert_array_equal(row["kv_end"], [2, 2, 5, 5, 5, 6])
  np.testing.assert_array_equal(row["pred_index"], [0, 0, 2, 2, 3, 5])
  np.testing.assert_array_equal(row["weights"], [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 2, 2, 0])


@pytest.mark.parametrize("seed", range(5))
def test_packing_random_lengths_keeps_invariants_and_all_tokens(seed):
  rng = np.random.default_rng(seed)
  seq_len = 32
  docs = _random_docs(rng, num_docs=40, max_len=20, with_masks=True)
  rows = list(packing.pack_documents(docs, seq_len, PAD))
  batch = packing.stack_rows(rows)
  assert batch["tokens"].shape == (len(rows), seq_len)
  packing.validate_batch(batch)
  # Every document lands whole, in order, one segment each.
  packed = [seg for row in rows for seg in _segments(row)]
  assert len(packed) == len(docs)
  for got, doc in zip(packed, docs):
    np.testing.assert_array_equal(got, doc.tokens)
  # Greedy: a row is only closed when the next document does not fit.
  for row, nxt in zip(rows[:-1], rows[1:]):
    used = int((row["segment_ids"] > 0).sum())
    assert used + len(_segments(nxt)[0]) > seq_len


@pytest.mark.parametrize("seed", range(3))
def test_kv_end_mask_is_block_diagonal_causal(seed):
  rng = np.random.default_rng(seed)
  rows = list(packing.pack_documents(_random_docs(rng, 30, 12), 24, PAD))
  batch = packing.stack_rows(rows)
  mask = np.asarray(reference.visibility_mask(batch["kv_end"]))
  seg = batch["segment_ids"]
  t = seg.shape[1]
  causal = np.tril(np.ones((t, t), bool))[None]
  same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  pad_self = (seg[:, :, None] == 0) & np.eye(t, dtype=bool)[None]
  np.testing.assert_array_equal(mask, causal & same_doc | pad_self)
  assert mask.any(axis=-1).all()  # every query sees at least itself


@pytest.mark.parametrize("seed", range(3))
def test_pred_index_and_weights_give_shifted_targets_within_documents(seed):
  rng = np.random.default_rng(seed)
  docs = _random_docs(rng, 30, 15, with_masks=True)
  rows = list(packing.pack_documents(docs, 40, PAD))
  # Targets the loss sees: (context position's token, target token, weight) in order.
  got = []
  for row in rows:
    for t in np.flatnonzero(row["weights"] > 0):
      p = row["pred_index"][t]
      assert p == t - 1 and row["segment_ids"][p] == row["segment_ids"][t]
      got.append((row["tokens"][p], row["tokens"][t], row["weights"][t]))
  expected = []
  for doc in docs:
    mask = np.ones(len(doc)) if doc.loss_mask is None else doc.loss_mask
    for t in range(1, len(doc)):
      if mask[t] > 0:
        expected.append((doc.tokens[t - 1], doc.tokens[t], mask[t]))
  assert got == expected
  # First tokens of documents and padding predict from themselves, untrained.
  for row in rows:
    seg = row["segment_ids"]
    first = np.flatnonzero(row["positions"] == 0)
    np.testing.assert_array_equal(row["pred_index"][first], first)
    assert np.all(row["weights"][first] == 0) and np.all(row["weights"][seg == 0] == 0)


def test_long_document_split_into_separate_chunks():
  doc = Document(np.arange(1, 26))  # 25 tokens
  rows = list(packing.pack_documents([doc], 10, PAD, long_docs="split"))
  assert len(rows) == 3
  for i, row in enumerate(rows):
    packing.validate_batch(row)
    chunk = np.arange(1 + 10 * i, min(11 + 10 * i, 26))
    np.testing.assert_array_equal(row["tokens"][:len(chunk)], chunk)
    np.testing.assert_array_equal(row["positions"][:len(chunk)], np.arange(len(chunk)))
    assert row["weights"][0] == 0 and np.all(row["weights"][1:len(chunk)] == 1)
  assert np.all(rows[2]["tokens"][5:] == PAD)


def test_long_document_split_chunks_share_rows_with_other_documents():
  docs = [Document(np.arange(1, 4)), Document(np.arange(10, 25)), Document([30, 31])]
  rows = list(packing.pack_documents(docs, 8, PAD))
  # [1 2 3] + chunk [10..17] does not fit -> row 0 holds only doc 0.
  assert [[s.tolist() for s in _segments(r)] for r in rows] == [
      [[1, 2, 3]], [list(range(10, 18))], [list(range(18, 25))], [[30, 31]]]


def test_long_document_truncate_keeps_prefix():
  doc = Document(np.arange(1, 26), np.ones(25))
  rows = list(packing.pack_documents([doc, Document([40, 41])], 10, PAD,
                                     long_docs="truncate"))
  assert len(rows) == 1 + 1
  np.testing.assert_array_equal(rows[0]["tokens"], np.arange(1, 11))
  np.testing.assert_array_equal(_segments(rows[1])[0], [40, 41])


def test_empty_documents_are_dropped():
  rows = list(packing.pack_documents([Document([]), Document([3, 4]), Document([])], 4, PAD))
  assert len(rows) == 1 and rows[0]["segment_ids"].max() == 1


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="loss_mask shape"):
    Document(np.arange(3), np.ones(2))
  with pytest.raises(ValueError, match="1-D"):
    Document(np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match="more than seq_len"):
    packing.layout_row([Document(np.arange(5))], 4, PAD)
  with pytest.raises(ValueError, match="long_docs"):
    list(packing.pack_documents([Document(np.arange(5))], 4, PAD, long_docs="drop"))


def _valid_batch() -> dict[str, np.ndarray]:
  docs = [Document([5, 6, 7]), Document([8, 9])]
  return packing.stack_rows([packing.layout_row(docs, 8, PAD)] * 2)


def _set(key, index, value):
  def corrupt(batch):
    batch[key][index] = value
  return corrupt


@pytest.mark.parametrize("corrupt, message", [
    (_set("kv_end", (0, 2), 2), "j < kv_end"),
    (_set("kv_end", (1, 7), 9), "kv_end"),
    (_set("pred_index", (0, 1), 2), "pred_index\\[t\\] <= t"),
    (_set("pred_index", (0, 4), 2), "visible from t"),
    (_set("weights", (0, 0), 1.0), "needs weights\\[t\\] == 0"),
    (_set("weights", (1, 2), -1.0), "weights must be finite"),
    (_set("weights", (0, 6), 0.0), None),  # still valid: padding already 0
    (_set("segment_ids", (0, 2), 0), "padding"),
    (_set("kv_end", (0, 1), 4), "must nest"),
    (_set("tokens", (0, 0), -3), "tokens must be >= 0"),
    (lambda b: b.pop("kv_end"), "missing keys"),
    (lambda b: b.update(positions=b["positions"][:, :4]), "shape"),
    (lambda b: b.update(weights=b["weights"].astype(np.int32)), "floating"),
])
def test_validate_batch_names_the_violation(corrupt, message):
  batch = _valid_batch()
  packing.validate_batch(batch)
  corrupt(batch)
  if message is None:
    packing.validate_batch(batch)
  else:
    with pytest.raises(ValueError, match=message):
      packing.validate_batch(batch)


def test_validate_batch_vocab_size():
  batch = _valid_batch()
  packing.validate_batch(batch, vocab_size=10)
  with pytest.raises(ValueError, match="vocab_size"):
    packing.validate_batch(batch, vocab_size=9)
