"""Tool calls in assistant text: the Qwen2.5 JSON format and the qwen3_coder XML format.

qwen2.5 (Qwen2.5-Instruct chat template, also `kat_jax.data.chat_template`):

    <tool_call>
    {"name": "read_file", "arguments": {"path": "m.py"}}
    </tool_call>

qwen3_coder (the `qwen3_coder` tool parser that KAT-Dev's vLLM recipe names; KAT-Coder blog):

    <tool_call>
    <function=read_file>
    <parameter=path>
    m.py
    </parameter>
    </function>
    </tool_call>

Parsing never raises on model output: malformed calls become `ParsedAction.errors` (the
environment shows them to the model), well-formed ones `ToolCall`s.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

TOOL_FORMATS = ("qwen2.5", "qwen3_coder")
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"^\s*<function=([^>\n]+)>(.*?)</function>\s*$", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str
  arguments: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ParsedAction:
  """An assistant turn: its text outside tool calls, the calls, and parse errors."""

  content: str
  tool_calls: tuple[ToolCall, ...] = ()
  errors: tuple[str, ...] = ()


def _check_format(fmt: str) -> None:
  if fmt not in TOOL_FORMATS:
    raise ValueError(f"unknown tool-call format {fmt!r}; valid: {', '.join(TOOL_FORMATS)}")


def _parse_json_call(body: str) -> ToolCall | str:
  try:
    value = json.loads(body)
  except json.JSONDecodeError as e:
    return f"tool call is not valid JSON: {e.msg} at char {e.pos}"
  if not isinstance(value, dict) or not isinstance(value.get("name"), str):
    return 'tool call must be a JSON object with a string "name"'
  arguments = value.get("arguments", {})
  if isinstance(arguments, str):  # OpenAI style: arguments serialised as a string
    try:
      arguments = json.loads(arguments)
    except json.JSONDecodeError:
      return f"tool call {value['name']!r}: arguments string is not JSON"
  if not isinstance(arguments, dict):
    return f"tool call {value['name']!r}: arguments must be a JSON object"
  return ToolCall(value["name"], arguments)


def _parse_xml_call(body: str) -> ToolCall | str:
  match = _FUNCTION.match(body)
  if not match:
    return "tool call must be <function=NAME>...</function>"
  name, inner = match.group(1).strip(), match.group(2)
  arguments = {k.strip(): v for k, v in _PARAMETER.findall(inner)}
  leftover = _PARAMETER.sub("", inner).strip()
  if leftover:
    return f"tool call {name!r}: text outside <parameter=...> blocks: {leftover[:40]!r}"
  return ToolCall(name, arguments)


def parse_tool_calls(text: str, fmt: str = "qwen2.5") -> ParsedAction:
  """Splits assistant text into content and tool calls (an unclosed last call is malformed)."""
  _check_format(fmt)
  calls, errors = [], []
  for match in _BLOCK.finditer(text):
    if not match.group(0).endswith("</tool_call>"):
      errors.append("unclosed <tool_call>")
      continue
    body = match.group(1).strip("\n")
    parsed = _parse_json_call(body) if fmt == "qwen2.5" else _parse_xml_call(body)
    (calls if isinstance(parsed, ToolCall) else errors).append(parsed)
  content = _BLOCK.sub("", text).strip()
  return ParsedAction(content, tuple(calls), tuple(errors))


def format_tool_call(call: ToolCall, fmt: str = "qwen2.5") -> str:
  """The text a model writes for `call` in format `fmt` (inverse of `parse_tool_calls`)."""
  _check_format(fmt)
  if fmt == "qwen2.5":
    body = json.dumps({"name": call.name, "arguments": dict(call.arguments)},
                      ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
  params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in call.arguments.items())
  return f"<tool_call>\n<function={call.name}>\n{params}</function>\n</tool_call>"
