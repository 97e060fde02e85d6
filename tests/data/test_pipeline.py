"""Tests for kat_jax.data.pipeline: packed Grain batches, determinism, checkpoints, sharding."""

from __future__ import annotations

import collections
import itertools
import json

import grain
import numpy as np
import pytest

from kat_jax.data import chat_template
from kat_jax.data import packing
from kat_jax.data import pipeline
from kat_jax.data import sources
from kat_jax.data import synthetic
from kat_jax.data import tokenizer


class FakeByteTokenizer:
  """Bytes shifted by 2; 0 = pad, 1 = eos (stands in for kat_jax.data.tokenizer)."""
  pad_id, eos_id, vocab_size = 0, 1, 258

  def encode(self, text: str, allow_special: bool = True) -> list[int]:
    del allow_special
    return [b + 2 for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    return bytes(int(i) - 2 for i in ids if i >= 2).decode("utf-8")


TOK = FakeByteTokenizer()
CORPUS = synthetic.generate_corpus(60, seed=0)


def _dataset(source=CORPUS, **kwargs):
  # Small read-ahead: tests build many short-lived iterators.
  args = dict(seq_len=128, batch_size=3, seed=0, num_epochs=1,
              read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  args.update(kwargs)
  return pipeline.make_pretrain_dataset(source, TOK, **args)


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _texts(batches) -> list[str]:
  """Texts of all documents in the batches (EOS stripped), in order."""
  texts = []
  for batch in batches:
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      texts += [TOK.decode(tokens[seg == s]) for s in range(1, seg.max() + 1)]
  return texts


def test_record_to_document_text_and_chat():
  doc = pipeline.record_to_document({"text": "ab"}, TOK)
  np.testing.assert_array_equal(doc.tokens, [99, 100, TOK.eos_id])
  assert doc.loss_mask is None
  chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]}
  doc = pipeline.record_to_document(chat, TOK)
  text = chat_template.render_chat(chat["messages"], template="qwen2.5")
  assert text.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
  assert TOK.decode(doc.tokens[:-1]) == text and doc.tokens[-1] == TOK.eos_id
  # Only the assistant turn (with its <|im_end|>) and the EOS are trained.
  assert TOK.decode(doc.tokens[doc.loss_mask == 1][:-1]) == "A<|im_end|>"
  assert doc.loss_mask[-1] == 1


def test_batches_follow_contract_and_match_pure_packer():
  batches = list(_dataset(shuffle=False))
  for batch in batches:
    assert batch["tokens"].shape == (3, 128) and batch["tokens"].dtype == np.int32
    packing.validate_batch(batch, vocab_size=TOK.vocab_size)
  docs = [pipeline.record_to_document(r, TOK) for r in CORPUS]
  rows = list(packing.pack_documents(docs, 128, TOK.pad_id))
  rows += [packing.empty_row(128, TOK.pad_id)] * (-len(rows) % 3)  # last batch completed
  _assert_batches_equal(batches, [packing.stack_rows(rows[i:i + 3])
                                  for i in range(0, len(rows), 3)])


def test_last_batch_padded_with_untrained_rows():
  records = [{"text": "x" * 100}, {"text": "y" * 100}]  # 2 x 101 tokens: one row
  batches = list(_dataset(records, seq_len=256, batch_size=3, shuffle=False))
  assert len(batches) == 1
  last = batches[-1]
  empty = last["segment_ids"].max(axis=1) == 0
  assert empty.tolist() == [False, True, True]
  assert np.all(last["weights"][empty] == 0) and np.all(last["tokens"][empty] == TOK.pad_id)


def test_one_epoch_covers_every_record_once_with_shuffle():
  texts = _texts(_dataset(seq_len=256))  # 256 > longest document: nothing split
  assert collections.Counter(texts) == collections.Counter(r["text"] for r in CORPUS)
  assert texts != [r["text"] for r in CORPUS]  # shuffled


def test_same_seed_same_batches_other_seed_differs():
  first = list(itertools.islice(_dataset(num_epochs=None, seed=5), 8))
  again = list(itertools.islice(_dataset(num_epochs=None, seed=5), 8))
  other = list(itertools.islice(_dataset(num_epochs=None, seed=6), 8))
  _assert_batches_equal(first, again)
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_epochs_are_reshuffled():
  per_epoch = len(CORPUS)
  texts = _texts(itertools.islice(_dataset(seq_len=256, num_epochs=2), 100))
  assert len(texts) == 2 * per_epoch
  first, second = texts[:per_epoch], texts[per_epoch:]
  assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("seq_len", [48, 128])  # 48: documents split across rows
@pytest.mark.parametrize("num_epochs", [1, None])
def test_state_restore_mid_epoch_gives_identical_batches(seq_len, num_epochs):
  ds = _dataset(seq_len=seq_len, batch_size=2, num_epochs=num_epochs)
  reference = list(itertools.islice(iter(ds), 200 if num_epochs else 30))  # finite: all
  split_points = [1, 2, 3, 5, 8, 13, 21] if num_epochs is None else [1, 4, 9, len(reference) - 2, len(reference)]
  seen_pending = False
  for k in split_points:
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives JSON (checkpoint files)
    seen_pending |= "pending\": true" in json.dumps(state)
    restored = iter(ds)
    next(restored)  # advance first: set_state must override progress, not add to it
    restored.set_state(state)
    _assert_batches_equal(list(itertools.islice(restored, 6)), reference[k:k + 6])
    # The original iterator continues unaffected by get_state.
    _assert_batches_equal(list(itertools.islice(it, 6)), reference[k:k + 6])
  assert seen_pending  # a checkpoint fell between the pieces / a carried-over document


def test_restore_at_end_of_finite_dataset_stays_exhausted():
  ds = _dataset(CORPUS[:10], batch_size=2)
  it = iter(ds)
  batches = list(it)
  state = json.loads(json.dumps(it.get_state()))
  restored = iter(ds)
  restored.set_state(state)
  assert list(restored) == [] and batches


def test_sharding_gives_disjoint_records_covering_the_source():
  shard_texts = [_texts(_dataset(seq_len=256, shard_index=i, shard_count=3))
                 for i in range(3)]
  sets = [set(t) for t in shard_texts]
  for a, b in itertools.combinations(sets, 2):
    assert not a & b
  assert set.union(*sets) == {r["text"] for r in CORPUS}
  assert sorted(len(t) for t in shard_texts) == [20, 20, 20]


def test_pipeline_reads_a_jsonl_source(tmp_path):
  path = synthetic.write_corpus_jsonl(tmp_path / "c.jsonl", 30, seed=2)
  texts = _texts(_dataset(sources.JsonlSource(path), seq_len=256, shuffle=False))
  assert texts == [r["text"] for r in synthetic.generate_corpus(30, seed=2)]


def test_pipeline_with_the_project_byte_tokenizer():
  tok = tokenizer.get_tokenizer("bytes")
  records = CORPUS[:20] + [{"messages": [{"role": "user", "content": "1 + 2?"},
                                         {"role": "assistant", "content": "3."}]}]
  ds = pipeline.make_pretrain_dataset(records, tok, seq_len=256, batch_size=2, seed=0,
                                      num_epochs=1, shuffle=False)
  batches = list(ds)
  for batch in batches:
    packing.validate_batch(batch, vocab_size=tok.vocab_size)
  first = batches[0]
  seg = first["segment_ids"][0]
  assert tok.decode(first["tokens"][0][seg == 1]) == CORPUS[0]["text"] + "<|endoftext|>"
  trained = np.concatenate([b["tokens"][b["weights"] > 0] for b in batches])
  assert "3.<|im_end|><|endoftext|>" in tok.decode(trained)
  assert "1 + 2?" not in tok.decode(trained)  # the prompt is not trained


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="shard_index"):
    _dataset(shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="seq_len"):
    _dataset(seq_len=0)
  with pytest.raises(ValueError, match="num_epochs"):
    _dataset(num_epochs=0)
  with pytest.raises(ValueError, match="fewer than shard_count"):
    _dataset(CORPUS[:2], shard_count=3)
