"""Offline teacher: store top-k log-probs per document, read them back packed like the tokens.

Storage (ArrayRecord of JSON records, `kat_jax.data.sources.write_array_record`): each source
record is written back unchanged plus one field::

  "teacher_topk": {"k": K, "num_tokens": L,
                   "logprobs": {"dtype": "float16", "shape": [L, K], "b64": ...},
                   "ids":      {"dtype": "int32",   "shape": [L, K], "b64": ...}}

`b64` is base64 of the C-order numpy bytes (compact enough and readable anywhere JSON is).
Row j of a document holds the teacher's top-k next-token distribution at document position j
(it predicts token j+1), computed on the document as the student sees it: long documents are
cut into the same pieces `packing.split_document` makes, each run on its own.

Reading: `TeacherDocument` carries the arrays beside tokens/mask through `split_document`, and
`make_teacher_dataset` packs rows with the same greedy packer as the pretrain pipeline, adding
`teacher_logprobs` [B,T,K] float32 and `teacher_ids` [B,T,K] int32 at the tokens' offsets
(padding: log-prob 0, id 0, never weighted).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kat_jax.data import packing, pipeline
from kat_jax.data.packing import Document
from kat_jax.distill.losses import topk_logprobs
from kat_jax.model import Decoder, ModelConfig, lm_head_kernel
from kat_jax.parallel import BATCH_AXES, global_batch, sharding_context
from kat_jax.train.losses import split_chunks

FIELD = "teacher_topk"


def encode_array(x: np.ndarray) -> dict[str, Any]:
  x = np.ascontiguousarray(x)
  return {"dtype": str(x.dtype), "shape": list(x.shape),
          "b64": base64.b64encode(x.tobytes()).decode("ascii")}


def decode_array(blob: dict[str, Any]) -> np.ndarray:
  try:
    raw = base64.b64decode(blob["b64"])
    return np.frombuffer(raw, dtype=np.dtype(blob["dtype"])).reshape(blob["shape"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"malformed {FIELD} array: {e}") from e


@dataclasses.dataclass(frozen=True)
class TeacherDocument(Document):
  """A Document with the teacher's top-k per token: logprobs [L,K] float, ids [L,K] int."""
  teacher_logprobs: np.ndarray | None = None
  teacher_ids: np.ndarray | None = None

  def __post_init__(self):
    super().__post_init__()
    lp, ids = np.asarray(self.teacher_logprobs), np.asarray(self.teacher_ids)
    if lp.ndim != 2 or lp.shape != ids.shape or lp.shape[0] != len(self):
      raise ValueError(f"teacher arrays must both be [L={len(self)}, K], got {lp.shape} and "
                       f"{ids.shape}")
    object.__setattr__(self, "teacher_logprobs", lp.astype(np.float32))
    object.__setattr__(self, "teacher_ids", ids.astype(np.int32))

  def slice(self, start: int, stop: int) -> TeacherDocument:
    mask = None if self.loss_mask is None else self.loss_mask[start:stop]
    return TeacherDocument(self.tokens[start:stop], mask, self.teacher_logprobs[start:stop],
                           self.teacher_ids[start:stop])


def attach_teacher(doc: Document, record: dict[str, Any]) -> TeacherDocument:
  """The record's stored teacher arrays joined to its Document (lengths must agree)."""
  if FIELD not in record:
    raise ValueError(f"record has no {FIELD!r} field; run the teacher_logits stage first")
  blob = record[FIELD]
  lp, ids = decode_array(blob["logprobs"]), decode_array(blob["ids"])
  if lp.shape[0] != len(doc):
    raise ValueError(f"{FIELD} covers {lp.shape[0]} tokens but the record tokenizes to "
                     f"{len(doc)}: same tokenizer/template as the teacher_logits stage?")
  return TeacherDocument(doc.tokens, doc.loss_mask, lp, ids)


class WithTeacher:
  """Picklable record -> TeacherDocument, wrapping a record -> Document function."""

  def __init__(self, to_document: Callable[[dict[str, Any]], Document]):
    self.to_document = to_document

  def __call__(self, record: dict[str, Any]) -> TeacherDocument:
    return attach_teacher(self.to_document(record), record)


def layout_teacher(docs: Sequence[TeacherDocument], seq_len: int, k: int
                   ) -> dict[str, np.ndarray]:
  """teacher_logprobs / teacher_ids [seq_len, k] for docs laid out as `packing.layout_row`."""
  lp = np.zeros((seq_len, k), np.float32)
  ids = np.zeros((seq_len, k), np.int32)
  start = 0
  for doc in docs:
    end = start + len(doc)
    if doc.teacher_logprobs.shape[1] != k:
      raise ValueError(f"teacher top-k {doc.teacher_logprobs.shape[1]} != expected {k}")
    lp[start:end], ids[start:end] = doc.teacher_logprobs, doc.teacher_ids
    start = end
  return {"teacher_logprobs": lp, "teacher_ids": ids}


class TeacherRowPacker(packing.RowPacker):
  """RowPacker whose rows also carry the teacher arrays."""

  def __init__(self, seq_len: int, pad_id: int, k: int):
    super().__init__(seq_len, pad_id)
    self.k = k

  def flush(self) -> dict[str, np.ndarray]:
    docs = list(self._docs)
    row = super().flush()
    row.update(layout_teacher(docs, self.seq_len, self.k))
    return row


class _TeacherPackIterator(pipeline._PackDatasetIterator):  # pylint: disable=protected-access
  """The pretrain packer with `TeacherRowPacker` rows (same checkpointable state)."""

  def __init__(self, parent, seq_len: int, pad_id: int, long_docs, pad_to_multiple: int,
               k: int):
    super().__init__(parent, seq_len, pad_id, long_docs, pad_to_multiple)
    self._k = k
    self._packer = TeacherRowPacker(seq_len, pad_id, k)

  def __next__(self) -> dict[str, np.ndarray]:
    self._fill_row()
    if not self._packer and self._rows % self._pad_to_multiple:
      row = packing.empty_row(self._seq_len, self._pad_id)
      row.update(layout_teacher([], self._seq_len, self._k))
      self._rows += 1
      return row
    return super().__next__()

  def set_state(self, state: dict[str, Any]) -> None:
    super().set_state(state)
    self._packer = TeacherRowPacker(self._seq_len, self._pad_id, self._k)
    # super().set_state re-read the pending document with the plain packer untouched.


class TeacherPackIterDataset(pipeline.PackIterDataset):
  def __init__(self, parent: grain.IterDataset, *, k: int, **kwargs):
    super().__init__(parent, **kwargs)
    self._k = k

  def __iter__(self) -> _TeacherPackIterator:
    return _TeacherPackIterator(self._parent.__iter__(), self._seq_len, self._pad_id,
                                self._long_docs, self._pad_to_multiple, self._k)


def make_teacher_dataset(source, *, to_document: Callable[[dict[str, Any]], Document],
                         k: int, seq_len: int, batch_size: int, seed: int,
                         pad_id: int, shuffle: bool = True, num_epochs: int | None = None,
                         shard_index: int = 0, shard_count: int = 1,
                         long_docs: packing.LongDocPolicy = "split",
                         read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Packed batches (the pretrain contract + teacher_logprobs/teacher_ids [B,T,K])."""
  if k < 1:
    raise ValueError(f"teacher top-k must be >= 1, got {k}")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).map(WithTeacher(to_document))
  rows = TeacherPackIterDataset(ds.to_iter_dataset(read_options), k=k, seq_len=seq_len,
                                pad_id=pad_id, long_docs=long_docs,
                                pad_to_multiple=batch_size)
  return rows.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------
# Computing the teacher's top-k
# ---------------------------------------------------------------------------


def make_topk_fn(config: ModelConfig, k: int, vocab: int | None = None, *,
                 chunk_size: int = 256):
  """jitted (params, tokens [B,T], kv_end [B,T]) -> (logprobs, ids) [B,T,K].

  The head runs in a `lax.scan` over chunks of `chunk_size` positions: only [B, chunk, V]
  float32 logits exist at a time (never [T,V] per row), and the row axis B keeps whatever
  sharding the inputs have (the stage splits rows over the mesh's batch axes).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  model = Decoder(config)

  @jax.jit
  def topk(params, tokens, kv_end):
    hidden = model.apply({"params": params}, tokens, None, kv_end, return_hidden=True)
    head = lm_head_kernel(params, config).astype(hidden.dtype)
    b, t, _ = hidden.shape
    chunk = min(chunk_size, t)
    xs = split_chunks(jnp.swapaxes(hidden, 0, 1), chunk)  # [T/chunk, chunk, B, d]

    def body(carry, h):
      logits = jnp.einsum("cbd,dv->cbv", h, head, preferred_element_type=jnp.float32)
      return carry, topk_logprobs(logits, k, vocab)

    _, (lp, ids) = jax.lax.scan(body, None, xs)
    unchunk = lambda x: jnp.swapaxes(x.reshape((-1, b, k))[:t], 0, 1)
    return unchunk(lp), unchunk(ids)

  return topk


def teacher_topk_for_documents(params, config: ModelConfig, docs: Iterable[Document], *,
                               k: int, seq_len: int, batch_size: int = 8,
                               long_docs: packing.LongDocPolicy = "split",
                               vocab: int | None = None, chunk_size: int = 256,
                               mesh: Mesh | None = None
                               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Per document: (logprobs [L',K], ids [L',K]) with L' = tokens kept by `long_docs`.

  Each piece (see `packing.split_document`) is its own padded row starting at position 0,
  exactly as it sits in a packed row (packing isolates documents). Documents are consumed
  lazily and results yielded in order as soon as all their pieces ran, so at most about
  `batch_size` pieces are held. With `mesh` (single process), each batch's rows are split
  over the mesh's batch axes (place `params` with the same mesh first).
  """
  topk = make_topk_fn(config, k, vocab, chunk_size=chunk_size)
  if mesh is not None:
    if jax.process_count() > 1:
      raise ValueError("teacher top-k over a mesh runs in one process; run one job per "
                       "data shard on multi-host setups")
    rows_per_step = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % rows_per_step:
      raise ValueError(f"teacher_logits.batch_size {batch_size} is not divisible by the "
                       f"mesh's data*fsdp = {rows_per_step}")
  pending: list[tuple[int, int, Document]] = []  # (doc index, piece index, piece)
  pieces_of: list[int] = []
  results: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
  next_doc = 0

  def run(batch: list[tuple[int, int, Document]]):
    rows = [packing.flat_example_to_row(p.tokens, seq_len, 0) for _, _, p in batch]
    while len(rows) < batch_size:  # fixed shape: one compilation
      rows.append(packing.empty_row(seq_len, 0))
    stacked = packing.stack_rows(rows)
    inputs = {"tokens": stacked["tokens"], "kv_end": stacked["kv_end"]}
    if mesh is not None:
      inputs = global_batch(inputs, mesh)
      with sharding_context(mesh):
        lp, ids = jax.device_get(topk(params, inputs["tokens"], inputs["kv_end"]))
    else:
      lp, ids = jax.device_get(topk(params, inputs["tokens"], inputs["kv_end"]))
    for r, (d, p, piece) in enumerate(batch):
      results[(d, p)] = (lp[r, :len(piece)], ids[r, :len(piece)])

  def drain():
    nonlocal next_doc
    while next_doc < len(pieces_of) and all(
        (next_doc, p) in results for p in range(pieces_of[next_doc])):
      parts = [results.pop((next_doc, p)) for p in range(pieces_of[next_doc])]
      next_doc += 1
      if parts:
        yield np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
      else:
        yield np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

  for d, doc in enumerate(docs):
    pieces = packing.split_document(doc, seq_len, long_docs)
    pieces_of.append(len(pieces))
    pending.extend((d, p, piece) for p, piece in enumerate(pieces))
    while len(pending) >= batch_size:
      run(pending[:batch_size])
      pending = pending[batch_size:]
    yield from drain()
  if pending:
    run(pending)
  yield from drain()


def records_with_teacher(records: Iterable[dict[str, Any]],
                         to_document: Callable[[dict[str, Any]], Document], params,
                         config: ModelConfig, *, k: int, seq_len: int, batch_size: int = 8,
                         long_docs: packing.LongDocPolicy = "split", vocab: int | None = None,
                         dtype: str = "float16", chunk_size: int = 256,
                         mesh: Mesh | None = None) -> Iterator[dict[str, Any]]:
  """Each record plus its `teacher_topk` field (log-probs stored as `dtype`), streamed:
  records are read as the teacher needs them, not loaded all at once."""
  pending: collections.deque = collections.deque()  # (record, doc) not yet yielded

  def documents():
    for record in records:
      doc = to_document(record)
      pending.append((record, doc))
      yield doc

  for lp, ids in teacher_topk_for_documents(
      params, config, documents(), k=k, seq_len=seq_len, batch_size=batch_size,
      long_docs=long_docs, vocab=vocab, chunk_size=chunk_size, mesh=mesh):
    record, doc = pending.popleft()
    if long_docs == "truncate":  # keep the arrays as long as the re-tokenized record
      lp = np.concatenate([lp, np.zeros((len(doc) - lp.shape[0], k), lp.dtype)])
      ids = np.concatenate([ids, np.zeros((len(doc) - ids.shape[0], k), ids.dtype)])
    yield {**record, FIELD: {"k": k, "num_tokens": len(doc),
                             "logprobs": encode_array(lp.astype(dtype)),
                             "ids": encode_array(ids.astype(np.int32))}}
