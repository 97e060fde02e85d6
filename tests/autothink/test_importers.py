"""Import adapters: chat JSONL / Parquet rows, malformed rows located and counted."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from kat_jax.autothink import importers, templates
from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.data.sources import RecordError
from kat_jax.data.tokenizer import get_tokenizer

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"},
                     {"role": "assistant", "content": "4"}]}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {}}}]


def _write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return path


def _mixed_file(tmp_path):
  return _write_lines(tmp_path / "chat.jsonl", [
      json.dumps(GOOD),                                                       # line 1
      "{not json",                                                            # line 2
      json.dumps({"messages": [{"role": "robot", "content": "x"}]}),          # line 3
      "",                                                                     # blank: ignored
      json.dumps({"messages": [{"role": "user", "content": 7}]}),             # line 5
      json.dumps({**GOOD, "tools": [{"description": "no name"}]}),            # line 6
      json.dumps({**GOOD, "tools": TOOLS}),                                   # line 7
      json.dumps({"text": "no messages"}),                                    # line 8
  ])


def test_jsonl_skips_and_counts_malformed_rows(tmp_path):
  result = importers.read_chat_jsonl(_mixed_file(tmp_path))
  assert result.num_rows == 7 and len(result.records) == 2 and result.num_skipped == 5
  assert result.locations == [f"{tmp_path / 'chat.jsonl'} line 1",
                              f"{tmp_path / 'chat.jsonl'} line 7"]
  joined = "\n".join(result.errors)
  for expected in ("line 2: field 'json'", "line 3: field 'messages[0].role'",
                   "line 5: field 'messages[0].content'", "line 6: field 'tools[0]'",
                   "line 8: field 'messages'"):
    assert expected in joined, joined


def test_jsonl_raise_mode_names_file_line_field(tmp_path):
  with pytest.raises(RecordError, match=r"chat.jsonl line 2: field 'json'"):
    importers.read_chat_jsonl(_mixed_file(tmp_path), on_error="raise")
  with pytest.raises(ValueError, match="no such file"):
    importers.read_chat_jsonl(tmp_path / "missing.jsonl")


def test_to_autothink_sft_conversions():
  plain = importers.to_autothink_sft(GOOD)
  assert plain["mode"] == "think_off"
  parsed = parse_autothink_response(plain["messages"][-1]["content"])
  assert parsed["well_formed"] and parsed["answer"] == "4"
  assert parsed["judge"] == importers.DEFAULT_JUDGE["think_off"]

  r1 = {"messages": [{"role": "user", "content": "q"},
                     {"role": "assistant", "content": "<think>\n2+2 is 4\n</think>\n\n4"}],
        "judge": "Check the sum."}
  converted = importers.to_autothink_sft(r1)
  parsed = parse_autothink_response(converted["messages"][-1]["content"])
  assert (parsed["mode"], parsed["think"], parsed["answer"], parsed["judge"]) == (
      "think_on", "2+2 is 4", "4", "Check the sum.")

  reasoning = {"messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "4", "reasoning_content": "r"}]}
  converted = importers.to_autothink_sft(reasoning)
  assert converted["mode"] == "think_on" and "reasoning_content" not in converted["messages"][-1]

  already = importers.to_autothink_sft({"messages": plain["messages"], "tools": TOOLS})
  assert already["messages"][-1]["content"] == plain["messages"][-1]["content"]
  assert already["tools"] == TOOLS
  with pytest.raises(RecordError, match="last message"):
    importers.to_autothink_sft({"messages": [{"role": "user", "content": "q"}]})
  with pytest.raises(RecordError, match="mode"):
    importers.to_autothink_sft({**GOOD, "mode": "think_on"})


def test_import_sft_records_feed_sft_documents(tmp_path, caplog):
  path = _write_lines(tmp_path / "c.jsonl", [json.dumps({**GOOD, "tools": TOOLS}),
                                             json.dumps({"messages": [GOOD["messages"][0]]}),
                                             "{not json"])
  with caplog.at_level(logging.WARNING):
    result = importers.import_sft_records(path)
  assert len(result.records) == 1 and result.num_skipped == 2
  assert any("c.jsonl line 2" in e for e in result.errors)
  # Each skip is logged with its location and reason (a conversion failure too), then a total.
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("c.jsonl line 2: field 'messages[0]'" in w and "last message" in w
             for w in warnings), warnings
  assert any("c.jsonl line 3: field 'json'" in w for w in warnings), warnings
  assert any("import_sft_records: skipped 2 of 3 rows" in w for w in warnings), warnings
  doc = templates.sft_document(result.records[0], get_tokenizer("bytes"))
  assert doc.loss_mask.sum() > 0 and doc.loss_mask[0] == 0


def test_parquet_rows(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.table({"messages": [json.dumps(GOOD["messages"]), "[{\"role\": 1}]"],
                    "tools": [json.dumps(TOOLS), None]})
  pq.write_table(table, tmp_path / "c.parquet")
  result = importers.read_chat_files(tmp_path / "c.parquet")
  assert len(result.records) == 1 and result.num_skipped == 1
  assert "c.parquet row 2: field 'messages[0].role'" in result.errors[0]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  (tmp_path / "c.parquet").write_bytes(b"PAR1")
  with pytest.raises(ImportError, match="pip install pyarrow"):
    importers.read_chat_parquet(tmp_path / "c.parquet")
