"""Tests for kat_jax.data.sources (JSONL / ArrayRecord) and kat_jax.data.synthetic."""

from __future__ import annotations

import json
import logging
import pickle
import re

from array_record.python import array_record_module
import pytest

from kat_jax.data import sources
from kat_jax.data import synthetic
from kat_jax.errors import DataError

RECORDS = [
    {"text": "hello"},
    {"text": "ünïcode ✓", "id": 7},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"text": ""},
]


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_jsonl_round_trip_across_files_with_blank_lines(tmp_path):
  a = _write_lines(tmp_path / "a.jsonl", [json.dumps(RECORDS[0]), "", json.dumps(RECORDS[1])])
  b = str(tmp_path / "b.jsonl")
  sources.write_jsonl(RECORDS[2:], b)
  source = sources.JsonlSource([a, b])
  assert len(source) == len(RECORDS)
  assert [source[i] for i in range(len(source))] == RECORDS
  assert source[-1] == RECORDS[-1]
  assert source.location(1) == (a, 3)  # blank line 2 skipped, numbering kept
  assert source.location(2) == (b, 1)
  assert source.num_skipped == 0
  # Picklable for grain worker processes, also after file handles were opened.
  clone = pickle.loads(pickle.dumps(source))
  assert [clone[i] for i in range(len(clone))] == RECORDS
  with pytest.raises(IndexError):
    source[len(RECORDS)]


BAD_ROWS = [
    ('{"text": "ok"', "json", "invalid JSON"),
    ('{"txt": "x"}', "text|messages", "missing"),
    ('{"text": 3}', "text", "must be a string, got int"),
    ('["text"]', "<record>", "JSON object"),
    ('{"text": "a", "messages": []}', "text|messages", "both present"),
    ('{"messages": [{"role": "user"}]}', "messages[0].content", "missing"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": 1, "content": "y"}]}',
     "messages[1].role", "must be a string"),
    ('{"messages": "hi"}', "messages", "non-empty list"),
]


@pytest.mark.parametrize("bad_line, field, problem", BAD_ROWS)
def test_jsonl_malformed_row_names_file_line_and_field(tmp_path, bad_line, field, problem):
  path = _write_lines(tmp_path / "data.jsonl",
                      [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), bad_line])
  with pytest.raises(sources.RecordError) as info:
    sources.JsonlSource(path)
  message = str(info.value)
  assert f"{path} line 3" in message and repr(field) in message and problem in message
  assert info.value.field == field


def test_tool_call_turn_may_omit_content():
  record = {"messages": [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "tool_calls": [{"name": "w", "arguments": {}}]}]}
  assert sources.validate_record(record) is record
  record["messages"][1]["tool_calls"] = []
  with pytest.raises(sources.RecordError, match="messages\\[1\\].content"):
    sources.validate_record(record)


def test_jsonl_lazy_validation_reports_on_read(tmp_path):
  path = _write_lines(tmp_path / "d.jsonl", [json.dumps(RECORDS[0]), '{"text": null}'])
  source = sources.JsonlSource(path, validate=False)
  assert len(source) == 2 and source[0] == RECORDS[0]
  with pytest.raises(sources.RecordError, match=re.escape(f"{path} line 2: field 'text'")):
    source[1]


def test_jsonl_skip_counts_and_logs(tmp_path, caplog):
  lines = [json.dumps(RECORDS[0]), "not json", json.dumps(RECORDS[1]), '{"text": 1}',
           json.dumps(RECORDS[2])]
  path = _write_lines(tmp_path / "d.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    source = sources.JsonlSource(path, on_error="skip")
  assert [source[i] for i in range(len(source))] == RECORDS[:3]
  assert source.num_skipped == 2
  assert "line 2" in source.skipped[0] and "line 4" in source.skipped[1]
  assert "skipped 2 of 5" in caplog.text
  assert [source.location(i)[1] for i in range(3)] == [1, 3, 5]


def test_bad_options_raise(tmp_path):
  path = _write_lines(tmp_path / "d.jsonl", [json.dumps(RECORDS[0])])
  with pytest.raises(ValueError, match="on_error"):
    sources.JsonlSource(path, on_error="ignore")
  with pytest.raises(ValueError, match="validate=True"):
    sources.JsonlSource(path, on_error="skip", validate=False)
  with pytest.raises(ValueError, match="no such file"):
    sources.JsonlSource(str(tmp_path / "missing.jsonl"))


def test_row_bytes_must_be_utf8_text(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\n')  # a UTF-8 byte-order mark is fine
  assert sources.JsonlSource(str(path))[0] == {"text": "bom"}
  path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1
  with pytest.raises(sources.RecordError, match=r"line 2: field 'bytes': not UTF-8 text "
                     r"\(byte 0xe9 at column 14\)"):
    sources.JsonlSource(str(path))
  path.write_bytes(b'\xff\xfe{\x00"\x00}\x00\n')  # UTF-16 with its mark: binary to us
  with pytest.raises(sources.RecordError, match=r"line 1: field 'bytes': binary data \(NUL "
                     r"byte at column 4\)"):
    sources.JsonlSource(str(path))


def test_a_source_without_records_names_its_files(tmp_path):
  empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(DataError, match=f"{re.escape(empty)}: no records"):
    sources.JsonlSource(empty)
  bad = _write_lines(tmp_path / "bad.jsonl", ['{"text": 1}', "[]"])
  with pytest.raises(DataError, match=f"{re.escape(bad)}: all 2 records are malformed"):
    sources.JsonlSource(bad, on_error="skip")
  with pytest.raises(DataError, match="is a directory"):
    sources.JsonlSource(str(tmp_path))


def test_array_record_round_trip(tmp_path):
  a, b = str(tmp_path / "a.array_record"), str(tmp_path / "b.array_record")
  assert sources.write_array_record(RECORDS[:2], a) == 2
  assert sources.write_array_record(RECORDS[2:], b) == 2
  source = sources.ArrayRecordSource([a, b])
  assert len(source) == 4
  assert [source[i] for i in range(4)] == RECORDS
  assert source.location(3) == (b, 2)
  clone = pickle.loads(pickle.dumps(source))
  assert clone[2] == RECORDS[2]


def _write_raw_array_record(path, payloads):
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for payload in payloads:
    writer.write(payload)
  writer.close()
  return path


def test_array_record_malformed_record_names_file_record_and_field(tmp_path):
  path = _write_raw_array_record(str(tmp_path / "x.array_record"),
                                 [json.dumps(RECORDS[0]).encode(), b'{"text": [1]}'])
  with pytest.raises(sources.RecordError,
                     match=re.escape(f"{path} record 2: field 'text': must be a string")):
    sources.ArrayRecordSource(path)
  lazy = sources.ArrayRecordSource(path, validate=False)
  assert lazy[0] == RECORDS[0]
  with pytest.raises(sources.RecordError, match="record 2"):
    lazy[1]


def test_array_record_skip_counts(tmp_path, caplog):
  path = _write_raw_array_record(
      str(tmp_path / "x.array_record"),
      [b"\xff\xfe", json.dumps(RECORDS[0]).encode(), b"{}", json.dumps(RECORDS[2]).encode()])
  with caplog.at_level(logging.WARNING):
    source = sources.ArrayRecordSource(path, on_error="skip")
  assert len(source) == 2 and source[0] == RECORDS[0] and source[1] == RECORDS[2]
  assert source.num_skipped == 2 and "skipped 2 of 4" in caplog.text
  assert source.location(1) == (path, 4)


def test_write_array_record_rejects_bad_records(tmp_path):
  with pytest.raises(sources.RecordError, match="record 2 written to"):
    sources.write_array_record([RECORDS[0], {"text": 5}], str(tmp_path / "x.array_record"))


def test_synthetic_corpus_is_deterministic_and_bounded():
  corpus = synthetic.generate_corpus(200, seed=3)
  assert corpus == synthetic.generate_corpus(200, seed=3)
  assert corpus != synthetic.generate_corpus(200, seed=4)
  assert synthetic.generate_corpus(50, seed=3) == corpus[:50]
  lengths = [len(r["text"].encode()) for r in corpus]
  assert min(lengths) >= synthetic.MIN_DOC_BYTES and max(lengths) <= synthetic.MAX_DOC_BYTES
  assert all(r["text"].isascii() for r in corpus)
  assert len({r["text"] for r in corpus}) > 190  # varied, not a handful of templates


def test_synthetic_facts_are_true():
  text = " ".join(r["text"] for r in synthetic.generate_corpus(300, seed=0))
  facts = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", text)
  assert len(facts) > 100
  for a, op, b, c in facts:
    assert eval(f"{a} {op} {b}") == int(c)  # pylint: disable=eval-used
  for word, rev in re.findall(r"reverse (\w+) -> (\w+)\.", text):
    assert rev == word[::-1]
  for table, key, value in re.findall(r"((?:[a-z]=\d ?)+)\. ([a-z])\? (\d)\.", text):
    assert dict(kv.split("=") for kv in table.split())[key] == value
  kinds = ["count by", "pattern:", "reverse", "?", " = "]
  assert all(kind in text for kind in kinds)


def test_write_corpus_jsonl_is_readable(tmp_path):
  path = synthetic.write_corpus_jsonl(tmp_path / "corpus.jsonl", 20, seed=1)
  source = sources.JsonlSource(path)
  assert [source[i] for i in range(len(source))] == synthetic.generate_corpus(20, seed=1)
