"""Random-access record sources (grain `RandomAccessDataSource`: `__len__`, `__getitem__`).

A record is a dict holding exactly one of
  {"text": str}                                             plain text, or
  {"messages": [{"role": str, "content": str}, ...]}        a chat (an assistant turn with
                                                            "tool_calls" may omit content);
other keys (ids, metadata) pass through untouched.

Malformed rows raise `RecordError` naming file, 1-based line (JSONL) or record (ArrayRecord) and
field; bytes that are not UTF-8 text (a binary file) are malformed rows too. With
`on_error="skip"` they are left out of the index instead; the count is logged and kept in
`num_skipped` (with the first few reasons in `skipped`), never dropped silently. A source with
no records left (empty files, or every row skipped) raises `DataError` naming its files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Literal, Sequence

from absl import logging
import numpy as np

from kat_jax.errors import DataError

OnError = Literal["raise", "skip"]
_MAX_KEPT_REASONS = 20


class RecordError(DataError):
  """A malformed record; `field` names the offending field ("json" for bad syntax, "bytes"
  for data that is not UTF-8 text)."""

  def __init__(self, field: str, problem: str, where: str = ""):
    self.field, self.problem, self.where = field, problem, where
    prefix = f"{where}: " if where else ""
    super().__init__(f"{prefix}field {field!r}: {problem}")

  def located(self, where: str) -> RecordError:
    return RecordError(self.field, self.problem, where)


def _type_name(value: Any) -> str:
  return type(value).__name__


def validate_record(record: Any) -> dict[str, Any]:
  """Returns `record` if it is a well-formed text or chat record, else raises RecordError."""
  if not isinstance(record, dict):
    raise RecordError("<record>", f"must be a JSON object, got {_type_name(record)}")
  has_text, has_messages = "text" in record, "messages" in record
  if has_text == has_messages:
    problem = "both present" if has_text else "missing (need 'text' or 'messages')"
    raise RecordError("text|messages", problem)
  if has_text:
    if not isinstance(record["text"], str):
      raise RecordError("text", f"must be a string, got {_type_name(record['text'])}")
    return record
  messages = record["messages"]
  if not isinstance(messages, list) or not messages:
    raise RecordError("messages", "must be a non-empty list of {role, content} objects")
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise RecordError(f"messages[{i}]", f"must be an object, got {_type_name(message)}")
    if message.get("content") is None and message.get("tool_calls"):
      keys = ("role",)  # a pure tool-call turn may omit its content (chat_template agrees)
    else:
      keys = ("role", "content")
    for key in keys:
      if key not in message:
        raise RecordError(f"messages[{i}].{key}", "missing")
      if not isinstance(message[key], str):
        raise RecordError(f"messages[{i}].{key}",
                          f"must be a string, got {_type_name(message[key])}")
  return record


def _decode_text(raw: bytes) -> str:
  """`raw` as UTF-8 text; RecordError("bytes", ...) for binary data or another encoding."""
  nul = raw.find(b"\0")
  if nul >= 0:
    raise RecordError("bytes", f"binary data (NUL byte at column {nul + 1}), not JSON text")
  try:
    return raw.decode("utf-8-sig")  # a leading byte-order mark is allowed, as json.loads does
  except UnicodeDecodeError as e:
    raise RecordError("bytes", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                      f"{e.start + 1})") from None


def parse_record(raw: bytes | str) -> dict[str, Any]:
  """JSON-decodes and validates one record (RecordError on non-text bytes, bad JSON or fields).

  Bytes must be UTF-8 (JSON's encoding; json.loads would guess UTF-16/32 from the first bytes).
  """
  text = _decode_text(raw) if isinstance(raw, bytes) else raw
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordError("json", f"invalid JSON at column {e.colno}: {e.msg}") from None
  return validate_record(record)


def _check_on_error(on_error: str, validate: bool) -> None:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  if on_error == "skip" and not validate:
    raise ValueError("on_error='skip' needs validate=True (skipping happens while indexing)")


def _as_path_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  if not paths:
    raise DataError("no data files given")
  for path in paths:
    if os.path.isdir(path):
      raise DataError(f"{path}: is a directory, not a data file")
    if not os.path.isfile(path):
      raise DataError(f"no such file: {path}")
  return paths


def _check_not_empty(kind: str, paths: list[str], kept: int, skipped: int) -> None:
  """DataError naming the files when no record is left to read."""
  if kept:
    return
  names = ", ".join(paths)
  if skipped:
    raise DataError(f"{names}: all {skipped} records are malformed and were skipped")
  raise DataError(f"{names}: no records ({kind} file{'s are' if len(paths) > 1 else ' is'} "
                  "empty)")


class _SkipLog:
  """Counts skipped rows and keeps the first few reasons."""

  def __init__(self):
    self.count = 0
    self.reasons: list[str] = []

  def add(self, error: RecordError) -> None:
    self.count += 1
    if len(self.reasons) < _MAX_KEPT_REASONS:
      self.reasons.append(str(error))

  def report(self, kind: str, total: int) -> None:
    if self.count:
      logging.warning("%s: skipped %d of %d malformed records; first: %s",
                      kind, self.count, total, self.reasons[0])


class JsonlSource:
  """Random access over JSON-lines files through a line-offset index built at construction.

  Blank lines are ignored. With `validate=True` (default, required for `on_error="skip"`)
  every line is parsed once while indexing, so a malformed row fails at start-up, not hours
  into training; with `validate=False` rows are only checked when read.

  Picklable (file handles are reopened lazily per process), as grain workers need.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               on_error: OnError = "raise", validate: bool = True):
    _check_on_error(on_error, validate)
    self.paths = _as_path_list(paths)
    self.on_error = on_error
    skips = _SkipLog()
    file_ids, offsets, lengths, line_numbers = [], [], [], []
    for file_id, path in enumerate(self.paths):
      offset = 0
      with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
          start, offset = offset, offset + len(line)
          if not line.strip():
            continue
          if validate:
            try:
              parse_record(line)
            except RecordError as e:
              located = e.located(f"{path} line {line_number}")
              if on_error == "raise":
                raise located from None
              skips.add(located)
              continue
          file_ids.append(file_id)
          offsets.append(start)
          lengths.append(len(line))
          line_numbers.append(line_number)
    skips.report("JsonlSource", len(offsets) + skips.count)
    _check_not_empty("JSONL", self.paths, len(offsets), skips.count)
    self.num_skipped, self.skipped = skips.count, skips.reasons
    self._file_ids = np.asarray(file_ids, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._line_numbers = np.asarray(line_numbers, np.int64)
    self._fds: dict[int, int] = {}

  def __len__(self) -> int:
    return int(self._offsets.shape[0])

  def location(self, index: int) -> tuple[str, int]:
    """(path, 1-based line number) of record `index`."""
    return self.paths[self._file_ids[index]], int(self._line_numbers[index])

  def _fd(self, file_id: int) -> int:
    fd = self._fds.get(file_id)
    if fd is None:
      fd = self._fds[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
    return fd

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    index %= len(self)
    file_id = int(self._file_ids[index])
    # pread: no shared file position, so concurrent reader threads are safe.
    raw = os.pread(self._fd(file_id), int(self._lengths[index]), int(self._offsets[index]))
    try:
      return parse_record(raw)
    except RecordError as e:
      path, line = self.location(index)
      raise e.located(f"{path} line {line}") from None

  def close(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_fds"] = {}
    return state

  def __repr__(self) -> str:
    return f"JsonlSource({len(self)} records from {len(self.paths)} files)"


class ArrayRecordSource:
  """Random access over ArrayRecord files whose records are UTF-8 JSON bytes.

  Wraps one `grain.sources.ArrayRecordDataSource` per file so errors can name the file and its
  1-based record number. `validate=True` reads every record once at construction (needed for
  `on_error="skip"`); for very large datasets pass `validate=False` to check lazily on read.
  """

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               on_error: OnError = "raise", validate: bool = True):
    import grain  # pylint: disable=g-import-not-at-top  (heavy; only this source needs it)
    _check_on_error(on_error, validate)
    self.paths = _as_path_list(paths)
    self.on_error = on_error
    self._readers = [grain.sources.ArrayRecordDataSource([p]) for p in self.paths]
    sizes = np.asarray([len(r) for r in self._readers], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(sizes)])
    self._valid: np.ndarray | None = None  # global indices kept; None = all
    skips = _SkipLog()
    if validate:
      valid = []
      for index in range(int(self._starts[-1])):
        try:
          self._read(index)
          valid.append(index)
        except RecordError as e:
          if on_error == "raise":
            raise
          skips.add(e)
      if skips.count:
        self._valid = np.asarray(valid, np.int64)
    skips.report("ArrayRecordSource", int(self._starts[-1]))
    _check_not_empty("ArrayRecord", self.paths, int(self._starts[-1]) - skips.count,
                     skips.count)
    self.num_skipped, self.skipped = skips.count, skips.reasons

  def __len__(self) -> int:
    return int(self._starts[-1]) if self._valid is None else int(self._valid.shape[0])

  def location(self, index: int) -> tuple[str, int]:
    """(path, 1-based record number within that file) of record `index`."""
    global_index = int(index if self._valid is None else self._valid[index])
    file_id = int(np.searchsorted(self._starts, global_index, side="right")) - 1
    return self.paths[file_id], global_index - int(self._starts[file_id]) + 1

  def _read(self, global_index: int) -> dict[str, Any]:
    file_id = int(np.searchsorted(self._starts, global_index, side="right")) - 1
    local = global_index - int(self._starts[file_id])
    try:
      return parse_record(self._readers[file_id][local])
    except RecordError as e:
      raise e.located(f"{self.paths[file_id]} record {local + 1}") from None

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    index %= len(self)
    return self._read(index if self._valid is None else int(self._valid[index]))

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self)} records from {len(self.paths)} files)"


def write_array_record(records: Iterable[dict[str, Any]], path: str | os.PathLike, *,
                       validate: bool = True) -> int:
  """Writes records as JSON bytes, one ArrayRecord record each; returns how many.

  `group_size:1` keeps reads random-access cheap (one record per chunk), as grain advises.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for count, record in enumerate(records, start=1):
      if validate:
        try:
          validate_record(record)
        except RecordError as e:
          raise e.located(f"record {count} written to {path}") from None
      writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
  finally:
    writer.close()
  return count


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike) -> int:
  """Writes records one JSON object per line (UTF-8); returns how many.

  The file appears whole or not at all (written aside, then renamed), so processes that
  share a directory never read a half-written file.
  """
  count = 0
  partial = f"{os.fspath(path)}.{os.getpid()}.partial"
  with open(partial, "w", encoding="utf-8") as f:
    for count, record in enumerate(records, start=1):
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(partial, path)
  return count
