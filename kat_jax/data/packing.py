"""Packing documents into fixed-length rows under the batch contract (pure numpy).

A packed row is a dict of `[T]` arrays (a batch stacks them to `[B, T]`):

  tokens      int32    token ids; padding = `pad_id`.
  positions   int32    RoPE position: index within the document; padding 0.
  kv_end      int32    one past the last query that may see the token (query i sees key j iff
                       j <= i < kv_end[j]): the end of j's document; padding j -> j + 1.
  pred_index  int32    tokens[t] is predicted from the hidden state at pred_index[t]: t - 1
                       inside a document; t itself (weight 0) for a document's first token and
                       for padding.
  weights     float32  loss weight of predicting tokens[t]: 0 for first tokens, padding and
                       tokens the source masks out (e.g. prompts), else the document's mask.
  segment_ids int32    1-based document index within the row, 0 for padding.

`validate_batch` checks these invariants; the tree packer reuses it, which is why its checks are
phrased for any `kv_end` layout (nested visibility intervals), not only for packed documents.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Literal, Sequence

import numpy as np

LongDocPolicy = Literal["split", "truncate"]

BATCH_KEYS = ("tokens", "positions", "kv_end", "pred_index", "weights", "segment_ids")
_INT_KEYS = ("tokens", "positions", "kv_end", "pred_index", "segment_ids")


@dataclasses.dataclass(frozen=True)
class Document:
  """One token sequence to train on.

  Attributes:
    tokens: [L] integer token ids.
    loss_mask: optional [L] mask, 1 = train on predicting this token (0 e.g. for prompt
      tokens). None trains on every token. The first token of a document is never trained
      (nothing predicts it), whatever its mask says.
  """
  tokens: np.ndarray
  loss_mask: np.ndarray | None = None

  def __post_init__(self):
    tokens = np.asarray(self.tokens)
    if tokens.ndim != 1:
      raise ValueError(f"Document.tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"Document.tokens must be integers, got dtype {tokens.dtype}")
    object.__setattr__(self, "tokens", tokens.astype(np.int32))
    if self.loss_mask is not None:
      mask = np.asarray(self.loss_mask, dtype=np.float32)
      if mask.shape != tokens.shape:
        raise ValueError(
            f"Document.loss_mask shape {mask.shape} != tokens shape {tokens.shape}")
      if np.any(mask < 0) or not np.all(np.isfinite(mask)):
        raise ValueError("Document.loss_mask must be finite and >= 0")
      object.__setattr__(self, "loss_mask", mask)

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  def slice(self, start: int, stop: int) -> Document:
    mask = None if self.loss_mask is None else self.loss_mask[start:stop]
    return Document(self.tokens[start:stop], mask)


def split_document(doc: Document, seq_len: int,
                   long_docs: LongDocPolicy = "split") -> list[Document]:
  """Cuts a document into pieces of at most `seq_len` tokens.

  "split": consecutive chunks of `seq_len`; each chunk becomes a separate document, so it
  restarts at position 0, sees none of the earlier chunks, and its first token gets weight 0.
  "truncate": keeps only the first `seq_len` tokens. Empty documents give no pieces.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if long_docs not in ("split", "truncate"):
    raise ValueError(f"long_docs must be 'split' or 'truncate', got {long_docs!r}")
  length = len(doc)
  if length <= seq_len:
    return [doc] if length else []
  if long_docs == "truncate":
    return [doc.slice(0, seq_len)]
  return [doc.slice(s, min(s + seq_len, length)) for s in range(0, length, seq_len)]


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only: every token sees itself (keeps softmax finite), weight 0."""
  flat = np.arange(seq_len, dtype=np.int32)
  return {
      "tokens": np.full(seq_len, pad_id, dtype=np.int32),
      "positions": np.zeros(seq_len, dtype=np.int32),
      "kv_end": flat + 1,
      "pred_index": flat.copy(),
      "weights": np.zeros(seq_len, dtype=np.float32),
      "segment_ids": np.zeros(seq_len, dtype=np.int32),
  }


def layout_row(docs: Sequence[Document], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Places documents one after another in a row of `seq_len` tokens, padding the rest.

  Returns a dict of [seq_len] arrays (see the module docstring).
  """
  total = sum(len(d) for d in docs)
  if total > seq_len:
    raise ValueError(f"documents hold {total} tokens, more than seq_len={seq_len}")
  row = empty_row(seq_len, pad_id)
  start = 0
  for segment, doc in enumerate(docs, start=1):
    length = len(doc)
    if not length:
      continue
    end = start + length
    row["tokens"][start:end] = doc.tokens
    row["positions"][start:end] = np.arange(length, dtype=np.int32)
    row["kv_end"][start:end] = end
    # The first token keeps pred_index = itself (from empty_row) and weight 0.
    row["pred_index"][start + 1:end] = np.arange(start, end - 1, dtype=np.int32)
    mask = np.ones(length, np.float32) if doc.loss_mask is None else doc.loss_mask
    row["weights"][start + 1:end] = mask[1:]
    row["segment_ids"][start:end] = segment
    start = end
  return row


def flat_example_to_row(tokens: np.ndarray, seq_len: int, pad_id: int,
                        loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One document (at most `seq_len` tokens) laid out as a padded row of [seq_len] arrays."""
  return layout_row([Document(tokens, loss_mask)], seq_len, pad_id)


class RowPacker:
  """Greedy sequential packer: fills one open row with documents in arrival order.

  A piece that does not fit in what is left of the row closes it (the tail is padded) and
  opens the next. Stateless between rows, which keeps checkpointing of the streaming version
  (`pipeline.PackIterDataset`) simple: nothing but the not-yet-placed piece is carried over.
  """

  def __init__(self, seq_len: int, pad_id: int):
    if seq_len <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.seq_len = seq_len
    self.pad_id = pad_id
    self._docs: list[Document] = []
    self._used = 0

  def __bool__(self) -> bool:
    return bool(self._docs)

  def fits(self, doc: Document) -> bool:
    return self._used + len(doc) <= self.seq_len

  def add(self, doc: Document) -> None:
    if not self.fits(doc):
      raise ValueError(f"document of {len(doc)} tokens does not fit: "
                       f"{self._used}/{self.seq_len} used")
    self._docs.append(doc)
    self._used += len(doc)

  def flush(self) -> dict[str, np.ndarray]:
    row = layout_row(self._docs, self.seq_len, self.pad_id)
    self._docs, self._used = [], 0
    return row


def pack_documents(docs: Iterable[Document], seq_len: int, pad_id: int, *,
                   long_docs: LongDocPolicy = "split") -> Iterator[dict[str, np.ndarray]]:
  """Greedily packs documents, in order, into rows of `seq_len` tokens.

  Documents longer than `seq_len` are split into chunks of `seq_len` ("split": each chunk is a
  separate document — position 0, no attention to earlier chunks, first token untrained) or cut
  to their first `seq_len` tokens ("truncate"). Empty documents are dropped.

  Yields:
    rows: dicts of [seq_len] arrays (the batch contract without the batch axis).
  """
  packer = RowPacker(seq_len, pad_id)
  for doc in docs:
    for piece in split_document(doc, seq_len, long_docs):
      if not packer.fits(piece):
        yield packer.flush()
      packer.add(piece)
  if packer:
    yield packer.flush()


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks rows of [T] arrays into a batch of [B, T] arrays."""
  if not rows:
    raise ValueError("stack_rows needs at least one row")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _check(condition: np.ndarray | bool, message: str, where: np.ndarray | None = None) -> None:
  if np.all(condition):
    return
  if where is not None:
    bad = np.argwhere(~np.asarray(condition, dtype=bool))
    message += f" (first at [row, index] = {bad[0].tolist()}, {len(bad)} in all)"
  raise ValueError(message)


def _check_nested_visibility(kv_end: np.ndarray) -> None:
  """Visibility intervals [j, kv_end[j]) must nest or be disjoint (documents, subtrees).

  Otherwise a query could see key k but not an earlier key j that k itself saw — a leak
  between documents/branches. A stack scan per row is O(T).
  """
  for b, row in enumerate(kv_end.tolist()):
    stack: list[int] = []  # kv_end of the open enclosing intervals, innermost last
    for j, end in enumerate(row):
      while stack and stack[-1] <= j:
        stack.pop()
      if stack and end > stack[-1]:
        raise ValueError(f"kv_end intervals must nest: token [{b}, {j}] is visible up to "
                         f"{end}, past the end {stack[-1]} of an interval that contains it")
      stack.append(end)


def validate_batch(batch: dict[str, np.ndarray], *, vocab_size: int | None = None) -> None:
  """Checks the batch contract; raises ValueError naming the first violation.

  Args:
    batch: dict with the keys of `BATCH_KEYS`, each [B, T] (or one row, [T]).
    vocab_size: if given, tokens must lie in [0, vocab_size).
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch is missing keys {missing}")
  arrays = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
  if arrays["tokens"].ndim == 1:
    arrays = {k: v[None] for k, v in arrays.items()}
  shape = arrays["tokens"].shape
  if len(shape) != 2:
    raise ValueError(f"tokens must be [B, T], got shape {shape}")
  for key, value in arrays.items():
    if value.shape != shape:
      raise ValueError(f"{key} has shape {value.shape}, tokens has {shape}")
  for key in _INT_KEYS:
    if not np.issubdtype(arrays[key].dtype, np.integer):
      raise ValueError(f"{key} must be integer, got dtype {arrays[key].dtype}")
  if not np.issubdtype(arrays["weights"].dtype, np.floating):
    raise ValueError(f"weights must be floating, got dtype {arrays['weights'].dtype}")

  length = shape[1]
  flat = np.arange(length)[None, :]
  tokens, kv_end, pred = arrays["tokens"], arrays["kv_end"], arrays["pred_index"]
  weights, segments = arrays["weights"], arrays["segment_ids"]
  _check(tokens >= 0, "tokens must be >= 0", tokens >= 0)
  if vocab_size is not None:
    _check(tokens < vocab_size, f"tokens must be < vocab_size={vocab_size}", tokens < vocab_size)
  _check(arrays["positions"] >= 0, "positions must be >= 0", arrays["positions"] >= 0)
  ok = (kv_end > flat) & (kv_end <= length)
  _check(ok, f"kv_end[j] must satisfy j < kv_end[j] <= T={length}", ok)
  ok = (pred >= 0) & (pred <= flat)
  _check(ok, "pred_index[t] must satisfy 0 <= pred_index[t] <= t", ok)
  ok = np.isfinite(weights) & (weights >= 0)
  _check(ok, "weights must be finite and >= 0", ok)
  ok = (pred < flat) | (weights == 0)
  _check(ok, "pred_index[t] == t (nothing predicts t) needs weights[t] == 0", ok)
  # The predicting position must be in t's context: t lies in the interval that sees it.
  pred_end = np.take_along_axis(kv_end, np.clip(pred, 0, length - 1), axis=1)
  ok = (pred == flat) | (flat < pred_end)
  _check(ok, "pred_index[t] must be visible from t (t < kv_end[pred_index[t]])", ok)
  _check(segments >= 0, "segment_ids must be >= 0", segments >= 0)
  ok = (segments > 0) | (weights == 0)
  _check(ok, "padding (segment_ids == 0) must have weight 0", ok)
  _check_nested_visibility(kv_end)


def pad_batch_rows(batch: dict[str, np.ndarray], multiple: int, pad_id: int
                   ) -> dict[str, np.ndarray]:
  """Appends padding-only rows (`empty_row`, zeros for any other key) until the row count is
  a multiple of `multiple` — e.g. of the mesh's batch shards, or a fixed rows-per-update so
  a jitted step compiles once."""
  rows, seq_len = batch["tokens"].shape
  extra = (-rows) % multiple
  if not extra:
    return batch
  pad = empty_row(seq_len, pad_id)
  return {k: np.concatenate([v, np.broadcast_to(pad.get(k, np.zeros(seq_len, v.dtype)),
                                                (extra, seq_len)).astype(v.dtype)])
          for k, v in batch.items()}
