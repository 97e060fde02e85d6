"""Import adapters for chat data a user brings: JSONL or Parquet rows with `messages`, `tools`.

Row format (OpenAI-style chat):
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str,
                 "tool_calls"?: [...], "reasoning_content"?: str}, ...],
   "tools"?: [{"type": "function", "function": {"name": str, ...}} | {"name": str, ...}],
   "mode"?: "think_on"|"think_off", "judge"?: str}
In Parquet, `messages` / `tools` are list columns or JSON strings.

Malformed rows raise `RecordError` naming file, line (JSONL) or row (Parquet) and field; with
`on_error="skip"` they are counted in `ImportResult.num_skipped`, never dropped silently: each
skip is logged at warning level with its file/line and reason (the first `_MAX_REASONS`, which
are also kept in `errors`; a flood of bad rows must not flood the log), then one warning with
the total.

`to_autothink_sft` turns a chat row into a cold-start example: the final assistant turn is put
in the Table 2 layout (kept as is when it already is; `<think>…</think>` or `reasoning_content`
-> think_on; else think_off), with the row's judge or a generic rationale.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging

from kat_jax.data.chat_template import (ROLES, format_autothink_response,
                                        parse_autothink_response)
from kat_jax.data.sources import RecordError
from kat_jax.tasks.dual_regime import DEFAULT_JUDGE

_MAX_REASONS = 20


@dataclasses.dataclass
class ImportResult:
  """Rows read: the kept records, how many rows there were and how many were skipped (why)."""
  records: list[dict[str, Any]]
  locations: list[str] = dataclasses.field(default_factory=list)  # 'file line N' per record
  num_rows: int = 0
  num_skipped: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)

  def skip(self, error: RecordError, kind: str) -> None:
    """Counts a skipped row; its reason is kept and logged for the first `_MAX_REASONS`."""
    self.num_skipped += 1
    if len(self.errors) < _MAX_REASONS:
      self.errors.append(str(error))
      logging.warning("%s: skipping row: %s", kind, error)

  def log_total(self, kind: str) -> None:
    """One warning with the skip total (reasons past the first `_MAX_REASONS` not logged)."""
    if self.num_skipped:
      unlisted = self.num_skipped - len(self.errors)
      logging.warning("%s: skipped %d of %d rows%s", kind, self.num_skipped, self.num_rows,
                      f" ({unlisted} reasons not logged individually)" if unlisted else "")


def _json_field(row: dict[str, Any], field: str) -> None:
  """Decodes a JSON-string column in place (Parquet often stores nested data as text)."""
  if isinstance(row.get(field), str):
    try:
      row[field] = json.loads(row[field])
    except json.JSONDecodeError as e:
      raise RecordError(field, f"is a string but not valid JSON ({e})") from None


def validate_chat_row(row: Any) -> dict[str, Any]:
  """Returns the row (nested JSON strings decoded) or raises RecordError naming the field."""
  if not isinstance(row, dict):
    raise RecordError("<row>", f"must be an object, got {type(row).__name__}")
  row = dict(row)
  _json_field(row, "messages")
  _json_field(row, "tools")
  messages = row.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RecordError("messages", "missing or not a non-empty list")
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
      raise RecordError(where, f"must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
      raise RecordError(f"{where}.role", f"is {role!r}, not one of {ROLES}")
    calls = message.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
      raise RecordError(f"{where}.tool_calls", "must be a list on an assistant message")
    content = message.get("content")
    if content is None and calls:
      continue
    if not isinstance(content, str):
      raise RecordError(f"{where}.content", f"must be a string, got {type(content).__name__}")
  tools = row.get("tools")
  if tools is not None:
    if not isinstance(tools, list):
      raise RecordError("tools", f"must be a list, got {type(tools).__name__}")
    for j, tool in enumerate(tools):
      fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
      if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise RecordError(f"tools[{j}]", "must be an object with a str 'name' "
                          "(or 'function.name')")
  if row.get("mode") is not None and row["mode"] not in ("think_on", "think_off"):
    raise RecordError("mode", f"is {row['mode']!r}, not 'think_on' or 'think_off'")
  if row.get("judge") is not None and not isinstance(row["judge"], str):
    raise RecordError("judge", f"must be a string, got {type(row['judge']).__name__}")
  return row


def _collect(rows: Iterable[tuple[str, Any]], on_error: str, kind: str) -> ImportResult:
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  result = ImportResult(records=[])
  for where, row in rows:
    result.num_rows += 1
    try:
      if isinstance(row, RecordError):
        raise row
      result.records.append(validate_chat_row(row))
      result.locations.append(where)
    except RecordError as e:
      located = e.located(where)
      if on_error == "raise":
        raise located from None
      result.skip(located, kind)
  result.log_total(kind)
  return result


def _paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise ValueError("no input files given")
  for p in paths:
    if not os.path.isfile(p):
      raise ValueError(f"no such file: {os.fspath(p)}")
  return [os.fspath(p) for p in paths]


def _jsonl_rows(paths: list[str]) -> Iterator[tuple[str, Any]]:
  for path in paths:
    with open(path, "rb") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          yield f"{path} line {number}", json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          yield f"{path} line {number}", RecordError("json", f"invalid JSON ({e})")


def read_chat_jsonl(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                    on_error: str = "skip") -> ImportResult:
  """Chat rows from JSON-lines files (blank lines ignored)."""
  return _collect(_jsonl_rows(_paths(paths)), on_error, "read_chat_jsonl")


def _parquet_rows(paths: list[str]) -> Iterator[tuple[str, Any]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
  for path in paths:
    for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
      yield f"{path} row {number}", row


def read_chat_parquet(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                      on_error: str = "skip") -> ImportResult:
  """Chat rows from Parquet files (needs pyarrow); rows numbered from 1 per file."""
  return _collect(_parquet_rows(_paths(paths)), on_error, "read_chat_parquet")


def read_chat_files(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                    on_error: str = "skip") -> ImportResult:
  """Dispatch on extension: `.parquet` -> Parquet, anything else -> JSONL."""
  paths = _paths(paths)
  parquet = [p for p in paths if p.endswith(".parquet")]
  jsonl = [p for p in paths if not p.endswith(".parquet")]
  out = ImportResult(records=[])
  for part in ([read_chat_jsonl(jsonl, on_error=on_error)] if jsonl else []) + (
      [read_chat_parquet(parquet, on_error=on_error)] if parquet else []):
    out.records += part.records
    out.locations += part.locations
    out.num_rows += part.num_rows
    out.num_skipped += part.num_skipped
    out.errors += part.errors[:_MAX_REASONS - len(out.errors)]
  return out


def to_autothink_sft(row: Mapping[str, Any]) -> dict[str, Any]:
  """A validated chat row -> SFT record {"messages", "tools"?, "mode"}; RecordError if its
  last turn is not a usable assistant answer."""
  messages = [dict(m) for m in row["messages"]]
  last = len(messages) - 1
  final = messages[last]
  if final["role"] != "assistant" or not isinstance(final.get("content"), str):
    raise RecordError(f"messages[{last}]", "the last message must be an assistant text turn")
  content = final["content"]
  parsed = parse_autothink_response(content)
  if parsed["well_formed"]:
    mode = parsed["mode"]
  else:
    think = final.pop("reasoning_content", None)
    answer = content
    if think is None and "<think>" in content and "</think>" in content:
      think = content.split("<think>", 1)[1].split("</think>", 1)[0].strip()
      answer = content.split("</think>", 1)[1]
    mode = row.get("mode") or ("think_on" if think else "think_off")
    if mode == "think_on" and not think:
      raise RecordError("mode", "is think_on but the answer has no reasoning to put in <think>")
    judge = row.get("judge") or DEFAULT_JUDGE[mode]
    try:
      content = format_autothink_response(judge, mode, answer.strip(),
                                          think if mode == "think_on" else None)
    except ValueError as e:
      raise RecordError(f"messages[{last}].content", str(e)) from None
  final.pop("reasoning_content", None)
  final["content"] = content
  messages[last] = final
  record = {"messages": messages, "mode": mode}
  if row.get("tools"):
    record["tools"] = row["tools"]
  return record


def import_sft_records(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                       on_error: str = "skip") -> ImportResult:
  """Read chat files and convert every row with `to_autothink_sft` (same error handling)."""
  result = read_chat_files(paths, on_error=on_error)
  converted = ImportResult(records=[], num_rows=result.num_rows,
                           num_skipped=result.num_skipped, errors=list(result.errors))
  for row, where in zip(result.records, result.locations):
    try:
      converted.records.append(to_autothink_sft(row))
      converted.locations.append(where)
    except RecordError as e:
      located = e.located(where)
      if on_error == "raise":
        raise located from None
      converted.skip(located, "to_autothink_sft")
  converted.log_total("import_sft_records")  # malformed + unconvertible rows together
  return converted

