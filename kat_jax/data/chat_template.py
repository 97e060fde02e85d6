"""ChatML rendering: the Qwen2.5-Instruct template and the KAT-V1-40B template.

Both templates are re-implemented in Python (no Jinja) from their rendered
output; see `docs/spec.md` §1.4 and §7.2.

- "qwen2.5": Qwen2.5-Instruct `tokenizer_config.json` chat template. The exact
  text of the tools system block and of tool calls was checked against HF
  `apply_chat_template` output for Qwen2.5-14B-Instruct quoted in
  `modelscope/AgentJet` `documents/tokenizer_nodes.md`, and the whole renderer
  against a public copy of the Jinja template run through transformers'
  `render_jinja_template` (16 conversations with/without tools, system
  messages, multi-call turns, merged tool responses, generation prompt).
- "kat": KAT-V1-40B (xinference `llm_family.json`, entry `KAT-V1`): Qwen2.5's
  ChatML with default system "You are a helpful assistant." (empty when tools
  are given), generation prompt `<|im_start|>assistant\\n<judge>\\n`, and every
  assistant turn in the history reduced to its final answer.

Rendering is built from pieces tagged with the message they come from, so the
same code gives the text (`render_chat`), the ids (`render_chat_tokens`) and the
token ranges of each message's content (`tokenize_chat`, `assistant_spans`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from kat_jax.data.tokenizer import IM_END, IM_START, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TEMPLATES = ("kat", "qwen2.5")
QWEN25_DEFAULT_SYSTEM = (
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
KAT_DEFAULT_SYSTEM = "You are a helpful assistant."
KAT_GENERATION_PREFIX = "<judge>\n"

# Qwen2.5 tools block, around one `json.dumps(tool)` line per tool.
_TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user "
    "query.\n\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\n<tools>")
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function "
    "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

Mode = Literal["think_on", "think_off"]


# ---------------------------------------------------------------------------
# AutoThink response layout
# ---------------------------------------------------------------------------

_AUTOTHINK_TAGS = ("<judge>", "</judge>", "<think_on>", "<think_off>",
                   "<think>", "</think>", "<answer>", "</answer>")
_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>")
_WELL_FORMED = re.compile(
    r"<judge>\n(?P<judge>.*?)\n</judge>\n\n"
    r"(?:<think_on>\n<think>\n(?P<think>.*?)\n</think>\n|(?P<off><think_off>)\n)"
    r"<answer>\n(?P<answer>.*)\n</answer>", re.DOTALL)


def format_autothink_response(judge: str, mode: Mode, answer: str,
                              think: str | None = None) -> str:
  """AutoThink assistant text in KAT's newline-delimited layout.

  think_on:  <judge>\\n{judge}\\n</judge>\\n\\n<think_on>\\n<think>\\n{think}\\n</think>\\n
             <answer>\\n{answer}\\n</answer>        (one string, wrapped here)
  think_off: <judge>\\n{judge}\\n</judge>\\n\\n<think_off>\\n<answer>\\n{answer}\\n</answer>
  """
  if mode not in ("think_on", "think_off"):
    raise ValueError(f"mode must be 'think_on' or 'think_off', got {mode!r}")
  if mode == "think_on" and think is None:
    raise ValueError("mode 'think_on' needs a think string")
  if mode == "think_off" and think is not None:
    raise ValueError("mode 'think_off' takes no think string (got one)")
  fields = {"judge": judge, "answer": answer}
  if think is not None:
    fields["think"] = think
  for name, value in fields.items():
    if not isinstance(value, str):
      raise ValueError(f"{name} must be str, got {type(value).__name__}")
    tags = [t for t in _AUTOTHINK_TAGS if t in value]
    if tags:  # would make the layout ambiguous to parse
      raise ValueError(f"{name} must not contain AutoThink tags, found {tags}")
  head = f"<judge>\n{judge}\n</judge>\n\n"
  if mode == "think_on":
    return head + f"<think_on>\n<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"
  return head + f"<think_off>\n<answer>\n{answer}\n</answer>"


def parse_autothink_response(text: str, *, judge_prefilled: bool = False
                             ) -> dict[str, Any]:
  """Split an AutoThink response into judge / mode / think / answer.

  Args:
    text: assistant text; trailing whitespace and stop strings are ignored.
    judge_prefilled: text is a generation that continued the KAT prompt
      (which already holds `<judge>\\n`), so the opening tag is implied.

  Returns:
    {"judge", "mode" ('think_on' | 'think_off' | None), "think", "answer",
     "well_formed"}. well_formed means the exact layout of
    `format_autothink_response`; otherwise each field is found leniently
    (None when absent) and stripped of surrounding whitespace.
  """
  if not isinstance(text, str):
    raise ValueError(f"text must be str, got {type(text).__name__}")
  if judge_prefilled:
    text = KAT_GENERATION_PREFIX + text
  text = _strip_stop_strings(text)
  m = _WELL_FORMED.fullmatch(text)
  if m and _no_tags(m.group("judge"), m.group("think"), m.group("answer")):
    return {"judge": m.group("judge"),
            "mode": "think_off" if m.group("off") else "think_on",
            "think": m.group("think"), "answer": m.group("answer"),
            "well_formed": True}
  return {"judge": _between(text, "<judge>", "</judge>"),
          "mode": _first_mode(text),
          "think": _between(text, "<think>", "</think>"),
          "answer": _lenient_answer(text),
          "well_formed": False}


def kat_history_answer(content: str) -> str:
  """What the KAT template keeps of a past assistant turn (docs/spec.md §7.2).

  The text after the last `<answer>\\n` up to `\\n</answer>`; without
  `<answer>\\n`, what follows `<think_off>` and then what follows `</think>`.
  """
  if "<answer>\n" in content:
    return content.split("<answer>\n")[-1].split("\n</answer>")[0]
  return content.split("<think_off>")[-1].split("</think>")[-1]


def _strip_stop_strings(text: str) -> str:
  text = text.rstrip()
  while any(text.endswith(s) for s in _STOP_STRINGS):
    for s in _STOP_STRINGS:
      if text.endswith(s):
        text = text[:-len(s)].rstrip()
  return text


def _no_tags(*values: str | None) -> bool:
  return all(v is None or not any(t in v for t in _AUTOTHINK_TAGS) for v in values)


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
  start = text.find(open_tag)
  if start < 0:
    return None
  start += len(open_tag)
  end = text.find(close_tag, start)
  return (text[start:] if end < 0 else text[start:end]).strip()


def _first_mode(text: str) -> Mode | None:
  on, off = text.find("<think_on>"), text.find("<think_off>")
  if on < 0 and off < 0:
    return None
  if off < 0 or 0 <= on < off:
    return "think_on"
  return "think_off"


def _lenient_answer(text: str) -> str | None:
  start = text.rfind("<answer>")
  if start < 0:
    return None
  rest = text[start + len("<answer>"):]
  return rest.split("</answer>")[0].strip()


# ---------------------------------------------------------------------------
# Message validation
# ---------------------------------------------------------------------------


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"messages[{i}]: must be a dict, got {type(message).__name__}")
    if "role" not in message:
      raise ValueError(f"messages[{i}]: missing field 'role'")
    role = message["role"]
    if role not in ROLES:
      raise ValueError(
          f"messages[{i}]: field 'role' is {role!r}; valid roles: {', '.join(ROLES)}")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
      if role != "assistant":
        raise ValueError(f"messages[{i}]: field 'tool_calls' only allowed on assistant messages")
      _validate_tool_calls(i, tool_calls)
    content = message.get("content")
    if content is None and role == "assistant" and tool_calls:
      continue  # a pure tool-call turn may omit content
    if "content" not in message:
      raise ValueError(f"messages[{i}]: missing field 'content'")
    if not isinstance(content, str):
      raise ValueError(
          f"messages[{i}]: field 'content' must be str, got {type(content).__name__}")


def _validate_tool_calls(index: int, tool_calls: Any) -> None:
  if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
    raise ValueError(f"messages[{index}]: field 'tool_calls' must be a list")
  for j, call in enumerate(tool_calls):
    call = call.get("function", call) if isinstance(call, Mapping) else call
    where = f"messages[{index}]: tool_calls[{j}]"
    if not isinstance(call, Mapping):
      raise ValueError(f"{where}: must be a dict")
    if not isinstance(call.get("name"), str):
      raise ValueError(f"{where}: missing str field 'name'")
    if "arguments" not in call:
      raise ValueError(f"{where}: missing field 'arguments'")


def _validate_tools(tools: Any) -> None:
  if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
    raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
  for j, tool in enumerate(tools):
    if not isinstance(tool, Mapping):
      raise ValueError(f"tools[{j}]: must be a dict, got {type(tool).__name__}")


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Piece:
  """A run of rendered text; role/index are None for template scaffolding."""
  text: str
  role: str | None = None
  message_index: int | None = None


def _tojson(value: Any) -> str:
  # HF's `tojson` filter: json.dumps with ensure_ascii=False, default separators.
  return json.dumps(value, ensure_ascii=False)


def _render_tool_call(call: Mapping[str, Any]) -> str:
  call = call.get("function", call)
  arguments = call["arguments"]
  # Qwen2.5's template always applies `tojson`, which would quote an already
  # serialised (OpenAI-style) string; like later Qwen templates we keep strings.
  args = arguments if isinstance(arguments, str) else _tojson(arguments)
  return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>'


def _system_pieces(messages, tools, template: str) -> list[_Piece]:
  has_system = bool(messages) and messages[0]["role"] == "system"
  if tools:
    # KAT drops its default system prompt when tools are given.
    default = QWEN25_DEFAULT_SYSTEM if template == "qwen2.5" else ""
    pieces = [_Piece(f"{IM_START}system\n")]
    if has_system:
      pieces.append(_Piece(messages[0]["content"], "system", 0))
    else:
      pieces.append(_Piece(default))
    tool_lines = "".join("\n" + _tojson(tool) for tool in tools)
    pieces.append(_Piece(_TOOLS_HEADER + tool_lines + _TOOLS_FOOTER + f"{IM_END}\n"))
    return pieces
  if has_system:
    return [_Piece(f"{IM_START}system\n"), _Piece(messages[0]["content"], "system", 0),
            _Piece(f"{IM_END}\n")]
  default = KAT_DEFAULT_SYSTEM if template == "kat" else QWEN25_DEFAULT_SYSTEM
  return [_Piece(f"{IM_START}system\n{default}{IM_END}\n")]


def _assistant_pieces(message, index: int, template: str, keep_reasoning: bool
                      ) -> list[_Piece]:
  content = message.get("content") or ""
  header = f"{IM_START}assistant\n"
  if template == "kat":
    if keep_reasoning:
      # Put the prefilled `<judge>\n` in the prompt part, so the span starts
      # where generation starts after the KAT generation prompt.
      if content.startswith(KAT_GENERATION_PREFIX):
        header += KAT_GENERATION_PREFIX
        content = content[len(KAT_GENERATION_PREFIX):]
    else:
      content = kat_history_answer(content)
  # Qwen2.5 writes '<|im_start|>assistant' + ('\n' + content if content) + one
  # '\n<tool_call>...' per call; the same text is split here as header
  # '<|im_start|>assistant\n' + body, so the body is what the model generates.
  calls = [_render_tool_call(c) for c in message.get("tool_calls") or []]
  if calls:
    body = "\n".join(([content] if content else []) + calls)
  else:
    body = content
  return [_Piece(header), _Piece(body + IM_END, "assistant", index), _Piece("\n")]


def _chat_pieces(messages, tools, add_generation_prompt: bool, template: str,
                 keep_last_reasoning: bool) -> list[_Piece]:
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")
  _validate_messages(messages)
  if tools is not None:
    _validate_tools(tools)
  pieces = _system_pieces(messages, tools, template)
  last = len(messages) - 1
  for i, message in enumerate(messages):
    role = message["role"]
    if role == "system" and i == 0:
      continue  # already in the system block
    if role in ("user", "system"):
      pieces += [_Piece(f"{IM_START}{role}\n"), _Piece(message["content"], role, i),
                 _Piece(f"{IM_END}\n")]
    elif role == "assistant":
      keep = keep_last_reasoning and i == last
      pieces += _assistant_pieces(message, i, template, keep)
    else:  # tool: consecutive tool messages share one user turn
      if i == 0 or messages[i - 1]["role"] != "tool":
        pieces.append(_Piece(f"{IM_START}user"))
      pieces += [_Piece("\n<tool_response>\n"), _Piece(message["content"], "tool", i),
                 _Piece("\n</tool_response>")]
      if i == last or messages[i + 1]["role"] != "tool":
        pieces.append(_Piece(f"{IM_END}\n"))
  if add_generation_prompt:
    prompt = f"{IM_START}assistant\n"
    if template == "kat":
      prompt += KAT_GENERATION_PREFIX
    pieces.append(_Piece(prompt))
  return pieces


def render_chat(messages: Sequence[Mapping[str, Any]], *,
                tools: Sequence[Mapping[str, Any]] | None = None,
                add_generation_prompt: bool = False, template: str = "kat",
                keep_last_reasoning: bool = False) -> str:
  """Render messages to ChatML text.

  Args:
    messages: dicts with 'role' in ROLES and str 'content'; assistant messages
      may carry 'tool_calls' (OpenAI style `{"function": {"name", "arguments"}}`
      or `{"name", "arguments"}`) and then may omit content.
    tools: JSON-schema tool descriptions, listed in the system block.
    add_generation_prompt: append the assistant header (KAT: plus `<judge>\\n`).
    template: "kat" or "qwen2.5".
    keep_last_reasoning: KAT only: render the final message, if it is an
      assistant turn, verbatim instead of reducing it to its answer (use for
      training on full AutoThink responses; the real template always reduces).
  """
  return "".join(p.text for p in _chat_pieces(
      messages, tools, add_generation_prompt, template, keep_last_reasoning))


@dataclasses.dataclass(frozen=True)
class TokenSpan:
  """Token range [start, end) holding the content of messages[message_index].

  For assistant turns the range also covers tool calls and the closing
  `<|im_end|>` (the model must learn to stop), but not the role header.
  """
  start: int
  end: int
  role: str
  message_index: int


@dataclasses.dataclass(frozen=True)
class ChatTokens:
  ids: list[int]
  spans: list[TokenSpan]

  def loss_mask(self, roles: Sequence[str] = ("assistant",),
                message_indices: Sequence[int] | None = None) -> np.ndarray:
    """[T] int32, 1 on tokens of the spans with a role in `roles` (and index in
    `message_indices` when given), else 0."""
    mask = np.zeros(len(self.ids), np.int32)
    for span in self.spans:
      if span.role in roles and (message_indices is None
                                 or span.message_index in message_indices):
        mask[span.start:span.end] = 1
    return mask


def tokenize_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *,
                  tools: Sequence[Mapping[str, Any]] | None = None,
                  add_generation_prompt: bool = False, template: str = "kat",
                  keep_last_reasoning: bool = False) -> ChatTokens:
  """Render and tokenize; also return the token span of every message's content.

  Each piece is encoded on its own (scaffolding runs merged), so a span
  boundary is always a token boundary. That equals encoding the whole text
  except where a content starts with whitespace that BPE would merge with the
  header's newline; it is also how generation sees it (prompt, then new ids).
  Added tokens written inside contents (KAT tags, `<tool_call>`) are single ids,
  as in HF `apply_chat_template(tokenize=True)`.
  """
  pieces = _chat_pieces(messages, tools, add_generation_prompt, template,
                        keep_last_reasoning)
  ids: list[int] = []
  spans: list[TokenSpan] = []
  scaffold = ""
  for piece in pieces:
    if piece.role is None:
      scaffold += piece.text
      continue
    ids += tokenizer.encode(scaffold)
    scaffold = ""
    start = len(ids)
    ids += tokenizer.encode(piece.text)
    spans.append(TokenSpan(start, len(ids), piece.role, piece.message_index))
  ids += tokenizer.encode(scaffold)
  return ChatTokens(ids, spans)


def render_chat_tokens(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                       **kwargs) -> list[int]:
  """Token ids of `render_chat(messages, **kwargs)` (see `tokenize_chat`)."""
  return tokenize_chat(tokenizer, messages, **kwargs).ids


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                    **kwargs) -> list[tuple[int, int]]:
  """[start, end) token ranges of the assistant turns (content + `<|im_end|>`)."""
  chat = tokenize_chat(tokenizer, messages, **kwargs)
  return [(s.start, s.end) for s in chat.spans if s.role == "assistant"]
