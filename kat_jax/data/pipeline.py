"""Grain input pipeline: records -> documents -> packed rows -> [B, T] batches.

    MapDataset.source(source)[shard_index::shard_count]   disjoint per-host slice
      .shuffle(seed).repeat(num_epochs)                   each epoch reshuffled (grain folds
                                                          the epoch into the seed)
      .map(record -> Document)                            tokenize (+ EOS, loss mask)
      .to_iter_dataset()
    PackIterDataset(seq_len)                              our packer: it emits kv_end /
                                                          pred_index / weights, which grain's
                                                          packers do not
      .batch(batch_size)

The resulting iterator is checkpointable: `state = it.get_state()` is a small JSON-serialisable
dict, and `it.set_state(state)` on a fresh iterator reproduces the same following batches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

import grain
import numpy as np

from kat_jax.data import chat_template as chat_template_lib
from kat_jax.data import packing
from kat_jax.data.packing import Document


class TokenizerLike(Protocol):
  eos_id: int
  pad_id: int

  def encode(self, text: str, allow_special: bool = True) -> list[int]:
    ...


def record_to_document(record: dict[str, Any], tokenizer: TokenizerLike, *,
                       add_eos: bool = True, chat_template: str = "qwen2.5") -> Document:
  """Tokenizes a text or chat record into a Document.

  Text: every token is trained. Chat: rendered by `chat_template.tokenize_chat` (template
  "qwen2.5" keeps assistant turns whole; "kat" reduces history turns to their answers); only
  assistant turns, with their closing `<|im_end|>`, are trained.
  `add_eos` appends `tokenizer.eos_id`, trained, so the model learns where documents end.
  """
  if "text" in record:
    tokens = list(tokenizer.encode(record["text"], allow_special=True))
    mask = None
  elif "messages" in record:
    chat = chat_template_lib.tokenize_chat(tokenizer, record["messages"],
                                           template=chat_template)
    tokens, mask = list(chat.ids), chat.loss_mask(("assistant",)).astype(np.float32)
  else:
    raise ValueError(f"record has neither 'text' nor 'messages': keys {sorted(record)}")
  if add_eos:
    tokens.append(tokenizer.eos_id)
    if mask is not None:
      mask = np.append(mask, np.float32(1.0))
  return Document(np.asarray(tokens, np.int32), mask)


class _PackDatasetIterator(grain.DatasetIterator):
  """Streams packed rows from a parent iterator of Documents (greedy sequential packing).

  Between rows the only carried-over data is the document whose pieces were not all placed
  yet. The checkpoint therefore stores the parent's state from just *before* that document was
  read plus how many of its pieces are already placed; restoring re-reads it.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int,
               long_docs: packing.LongDocPolicy, pad_to_multiple: int):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._long_docs = seq_len, pad_id, long_docs
    self._pad_to_multiple = pad_to_multiple
    self._packer = packing.RowPacker(seq_len, pad_id)
    self._pending: list[Document] = []   # pieces of the current document not yet placed
    self._pending_state: Any = None      # parent state before the current document
    self._placed = 0                     # pieces of the current document already placed
    self._rows = 0                       # rows emitted so far
    self._exhausted = False

  def _pieces(self, doc: Document) -> list[Document]:
    return packing.split_document(doc, self._seq_len, self._long_docs)

  def _fill_row(self) -> None:
    while True:
      if not self._pending:
        if self._exhausted:
          return
        state_before = self._parent.get_state()
        try:
          doc = next(self._parent)
        except StopIteration:
          self._exhausted = True
          return
        self._pending, self._pending_state, self._placed = self._pieces(doc), state_before, 0
        continue  # an empty document has no pieces
      if not self._packer.fits(self._pending[0]):
        return
      self._packer.add(self._pending.pop(0))
      self._placed += 1

  def __next__(self) -> dict[str, np.ndarray]:
    self._fill_row()
    if self._packer:
      row = self._packer.flush()
    elif self._rows % self._pad_to_multiple:
      row = packing.empty_row(self._seq_len, self._pad_id)  # complete the last batch
    else:
      raise StopIteration
    self._rows += 1
    return row

  def get_state(self) -> dict[str, Any]:
    pending = bool(self._pending)
    return {
        "parent": self._pending_state if pending else self._parent.get_state(),
        "pending": pending,
        "placed": self._placed if pending else 0,
        "rows": self._rows,
        "exhausted": self._exhausted and not pending,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._packer = packing.RowPacker(self._seq_len, self._pad_id)
    self._pending, self._pending_state, self._placed = [], None, 0
    self._rows, self._exhausted = int(state["rows"]), bool(state["exhausted"])
    if state["pending"]:
      doc = next(self._parent)
      self._placed = int(state["placed"])
      self._pending = self._pieces(doc)[self._placed:]
      self._pending_state = state["parent"]


class PackIterDataset(grain.IterDataset):
  """Packs a stream of `Document`s into rows of `seq_len` tokens (see `packing`).

  Args:
    parent: IterDataset of Documents.
    seq_len: row length T.
    pad_id: padding token id.
    long_docs: "split" or "truncate" documents longer than `seq_len`.
    pad_to_multiple: at the end of a finite stream, add padding-only rows until the number of
      rows is a multiple of this (the batch size), so every batch is full [B, T].
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int,
               long_docs: packing.LongDocPolicy = "split", pad_to_multiple: int = 1):
    super().__init__(parent)
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    if pad_to_multiple <= 0:
      raise ValueError(f"pad_to_multiple must be positive, got {pad_to_multiple}")
    if long_docs not in ("split", "truncate"):
      raise ValueError(f"long_docs must be 'split' or 'truncate', got {long_docs!r}")
    self._seq_len, self._pad_id = seq_len, pad_id
    self._long_docs, self._pad_to_multiple = long_docs, pad_to_multiple

  def __iter__(self) -> _PackDatasetIterator:
    return _PackDatasetIterator(self._parent.__iter__(), self._seq_len, self._pad_id,
                                self._long_docs, self._pad_to_multiple)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, long_docs={self._long_docs})"


def make_pretrain_dataset(
    source: Sequence[dict[str, Any]],
    tokenizer: TokenizerLike,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    add_eos: bool = True,
    long_docs: packing.LongDocPolicy = "split",
    to_document: Callable[[dict[str, Any]], Document] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
  """Packed next-token-prediction batches from a random-access record source.

  Args:
    source: random-access records (`__len__`, `__getitem__`), e.g. `JsonlSource`.
    tokenizer: anything with `encode(text, allow_special=True)`, `eos_id` and `pad_id`.
    seq_len: T, tokens per row.
    batch_size: B, rows per batch (per host).
    seed: shuffle seed; each epoch is shuffled differently but deterministically.
    shuffle: shuffle records (globally, within this host's shard).
    num_epochs: passes over the shard; None repeats forever.
    shard_index, shard_count: this host reads records shard_index, shard_index + shard_count,
      ... — disjoint across hosts.
    add_eos: append `tokenizer.eos_id` to every document.
    long_docs: "split" or "truncate" documents longer than `seq_len` (see `packing`).
    to_document: overrides `record_to_document` (record -> Document).
    read_options: grain read threads / prefetch buffer for the record -> Document stage.

  Returns:
    IterDataset of dicts of [B, T] arrays (the batch contract in `packing`). With a finite
    `num_epochs` the last batch is completed with padding-only rows (weight 0).
  """
  if seq_len <= 0 or batch_size <= 0:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  if len(source) < shard_count:
    raise ValueError(f"source has {len(source)} records, fewer than shard_count={shard_count}")
  if to_document is None:
    # A partial, not a lambda: picklable for grain's multiprocess prefetch.
    to_document = functools.partial(record_to_document, tokenizer=tokenizer, add_eos=add_eos)

  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).map(to_document)
  docs = ds.to_iter_dataset(read_options)
  rows = PackIterDataset(docs, seq_len=seq_len, pad_id=tokenizer.pad_id,
                         long_docs=long_docs, pad_to_multiple=batch_size)
  return rows.batch(batch_size, drop_remainder=True)
