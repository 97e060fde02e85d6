"""Tests for kat_jax.data.chat_template: golden renderings, spans, AutoThink I/O."""

from __future__ import annotations

import pytest

from kat_jax.data.chat_template import (
    assistant_spans, format_autothink_response, kat_history_answer,
    parse_autothink_response, render_chat, render_chat_tokens, tokenize_chat)
from kat_jax.data.tokenizer import get_tokenizer

S, E = "<|im_start|>", "<|im_end|>"

THINK_ON = format_autothink_response(
    "Multi-step arithmetic: think.", "think_on", "The answer is 42.",
    think="6 * 7 = 42.")
THINK_OFF = format_autothink_response("Greeting: no need to think.", "think_off", "Hi!")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module", params=["qwen2.5", "bytes"])
def tok(request):
  return get_tokenizer(request.param)


# ---- AutoThink layout ---------------------------------------------------------


def test_format_layout_exact():
  assert THINK_ON == (
      "<judge>\nMulti-step arithmetic: think.\n</judge>\n\n<think_on>\n<think>\n"
      "6 * 7 = 42.\n</think>\n<answer>\nThe answer is 42.\n</answer>")
  assert THINK_OFF == (
      "<judge>\nGreeting: no need to think.\n</judge>\n\n<think_off>\n<answer>\nHi!\n</answer>")


@pytest.mark.parametrize("judge,mode,answer,think", [
    ("j", "think_on", "a", "t"),
    ("j", "think_off", "a", None),
    ("multi\nline judge", "think_on", "line1\n\nline2\n", "\nthoughts\n\n"),
    ("", "think_off", "", None),
])
def test_format_parse_round_trip(judge, mode, answer, think):
  text = format_autothink_response(judge, mode, answer, think)
  assert parse_autothink_response(text) == {
      "judge": judge, "mode": mode, "think": think, "answer": answer,
      "well_formed": True}


def test_parse_generation_after_kat_prompt():
  generated = THINK_OFF[len("<judge>\n"):] + "<|im_end|>"
  parsed = parse_autothink_response(generated, judge_prefilled=True)
  assert parsed["well_formed"] and parsed["mode"] == "think_off"
  assert parsed["answer"] == "Hi!"


def test_parse_malformed_is_lenient():
  parsed = parse_autothink_response(
      "<judge> hard </judge> <think_on> <think> hmm </think> <answer> 7 </answer>")
  assert parsed == {"judge": "hard", "mode": "think_on", "think": "hmm",
                    "answer": "7", "well_formed": False}
  truncated = parse_autothink_response(
      "<judge>\nx\n</judge>\n\n<think_on>\n<think>\nstill thinking")
  assert truncated["well_formed"] is False
  assert truncated["mode"] == "think_on" and truncated["answer"] is None
  assert truncated["think"] == "still thinking"
  assert parse_autothink_response("just text")["mode"] is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(judge="j", mode="think", answer="a"), "mode must be"),
    (dict(judge="j", mode="think_on", answer="a"), "needs a think"),
    (dict(judge="j", mode="think_off", answer="a", think="t"), "takes no think"),
    (dict(judge="j</judge>", mode="think_off", answer="a"), "judge must not contain"),
    (dict(judge="j", mode="think_off", answer=3), "answer must be str"),
])
def test_format_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    format_autothink_response(**kwargs)


@pytest.mark.parametrize("content,expected", [
    (THINK_ON, "The answer is 42."),
    (THINK_OFF, "Hi!"),
    ("<judge>\nj\n</judge>\n\n<think_off>\nno answer tags", "\nno answer tags"),
    ("<think>\nt\n</think>\nafter think", "\nafter think"),
    ("plain reply", "plain reply"),
    ("<answer>\nfirst\n</answer> <answer>\nlast\n</answer>", "last"),
])
def test_kat_history_answer_rules(content, expected):
  assert kat_history_answer(content) == expected


# ---- golden renderings --------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": THINK_OFF},
    {"role": "user", "content": "What is 6*7?"},
]


def test_kat_two_turns_with_generation_prompt():
  assert render_chat(TWO_TURNS, add_generation_prompt=True) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nHello<|im_end|>\n"
      "<|im_start|>assistant\nHi!<|im_end|>\n"
      "<|im_start|>user\nWhat is 6*7?<|im_end|>\n"
      "<|im_start|>assistant\n<judge>\n")


def test_kat_past_think_on_turn_reduced_to_answer():
  messages = [
      {"role": "system", "content": "Be exact."},
      {"role": "user", "content": "What is 6*7?"},
      {"role": "assistant", "content": THINK_ON},
  ]
  assert render_chat(messages) == (
      "<|im_start|>system\nBe exact.<|im_end|>\n"
      "<|im_start|>user\nWhat is 6*7?<|im_end|>\n"
      "<|im_start|>assistant\nThe answer is 42.<|im_end|>\n")
  # For training on the full response, the last turn can be kept verbatim.
  assert render_chat(messages, keep_last_reasoning=True).endswith(
      f"{S}assistant\n{THINK_ON}{E}\n")


def test_qwen25_two_turns():
  messages = [{"role": "user", "content": "Hello"},
              {"role": "assistant", "content": "Hi!"},
              {"role": "user", "content": "Bye"}]
  assert render_chat(messages, template="qwen2.5", add_generation_prompt=True) == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
      "assistant.<|im_end|>\n"
      "<|im_start|>user\nHello<|im_end|>\n"
      "<|im_start|>assistant\nHi!<|im_end|>\n"
      "<|im_start|>user\nBye<|im_end|>\n"
      "<|im_start|>assistant\n")
  # No reduction in the Qwen2.5 template.
  assert THINK_ON in render_chat([{"role": "assistant", "content": THINK_ON}],
                                 template="qwen2.5")


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris"}}},
        {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]},
    {"role": "tool", "content": "21 °C"},
    {"role": "tool", "content": "9 °C"},
    {"role": "assistant", "content": "Paris 21 °C, Oslo 9 °C."},
]

TOOLS_BLOCK = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a '
    'city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
    "</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n')

TOOL_TURNS = (
    "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n21 °C\n</tool_response>\n"
    "<tool_response>\n9 °C\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nParis 21 °C, Oslo 9 °C.<|im_end|>\n")


def test_qwen25_tools_golden():
  text = render_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL], template="qwen2.5")
  assert text == (
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
      "assistant." + TOOLS_BLOCK + TOOL_TURNS)


def test_kat_tools_golden_has_empty_default_system():
  text = render_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
  assert text == "<|im_start|>system\n" + TOOLS_BLOCK + TOOL_TURNS
  with_system = render_chat([{"role": "system", "content": "Sys."}] + TOOL_CONVERSATION,
                            tools=[WEATHER_TOOL])
  assert with_system == "<|im_start|>system\nSys." + TOOLS_BLOCK + TOOL_TURNS


def test_assistant_content_before_tool_calls():
  messages = [{"role": "user", "content": "u"},
              {"role": "assistant", "content": "Let me check.",
               "tool_calls": [{"name": "f", "arguments": {}}]}]
  assert render_chat(messages, template="qwen2.5").endswith(
      "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
      '{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n')


def test_late_system_message_is_a_normal_turn():
  messages = [{"role": "user", "content": "u"}, {"role": "system", "content": "late"}]
  assert render_chat(messages).endswith(
      "<|im_start|>user\nu<|im_end|>\n<|im_start|>system\nlate<|im_end|>\n")


# ---- tokens and spans ---------------------------------------------------------


@pytest.mark.parametrize("template", ["kat", "qwen2.5"])
def test_tokens_match_encoding_of_text(tok, template):
  for messages, tools in [(TWO_TURNS, None), (TOOL_CONVERSATION, [WEATHER_TOOL])]:
    for gen in (False, True):
      kwargs = dict(tools=tools, add_generation_prompt=gen, template=template)
      assert render_chat_tokens(tok, messages, **kwargs) == tok.encode(
          render_chat(messages, **kwargs))


def test_spans_cover_message_contents(tok):
  chat = tokenize_chat(tok, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
  pieces = [(s.role, s.message_index, tok.decode(chat.ids[s.start:s.end])) for s in chat.spans]
  assert pieces == [
      ("user", 0, "Weather in Paris and Oslo?"),
      ("assistant", 1, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
       '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
       "</tool_call><|im_end|>"),
      ("tool", 2, "21 °C"),
      ("tool", 3, "9 °C"),
      ("assistant", 4, "Paris 21 °C, Oslo 9 °C.<|im_end|>"),
  ]
  mask = chat.loss_mask()
  assert mask.shape == (len(chat.ids),) and mask.dtype.name == "int32"
  assert int(mask.sum()) == sum(s.end - s.start for s in chat.spans if s.role == "assistant")
  assert [i for i, m in enumerate(mask) if m] == [
      i for a, b in assistant_spans(tok, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
      for i in range(a, b)]
  # Every assistant span ends with the stop token, so the model learns to stop.
  assert all(chat.ids[s.end - 1] == tok.im_end_id for s in chat.spans if s.role == "assistant")
  assert chat.loss_mask(message_indices=[4]).sum() == chat.spans[-1].end - chat.spans[-1].start


@pytest.mark.parametrize("response", [THINK_ON, THINK_OFF])
def test_kat_prompt_is_prefix_of_training_sequence(tok, response):
  """Prompt ids (with the <judge> prefill) + generated ids == training ids."""
  messages = TWO_TURNS + [{"role": "assistant", "content": response}]
  prompt = render_chat_tokens(tok, TWO_TURNS, add_generation_prompt=True)
  chat = tokenize_chat(tok, messages, keep_last_reasoning=True)
  assert chat.ids[:len(prompt)] == prompt
  last = chat.spans[-1]
  assert last.start == len(prompt)
  assert tok.decode(chat.ids[last.start:last.end]) == response[len("<judge>\n"):] + E
  assert chat.ids[last.start:].count(tok.token_to_id("<answer>")) == 1
  parsed = parse_autothink_response(tok.decode(chat.ids[last.start:last.end]),
                                    judge_prefilled=True)
  assert parsed["well_formed"]


def test_qwen25_prompt_is_prefix_of_full_sequence(tok):
  messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
  prompt = render_chat_tokens(tok, messages[:1], add_generation_prompt=True, template="qwen2.5")
  full = render_chat_tokens(tok, messages, template="qwen2.5")
  assert full[:len(prompt)] == prompt
  assert tok.decode(full[len(prompt):]) == "Hi!<|im_end|>\n"


# ---- errors -------------------------------------------------------------------


@pytest.mark.parametrize("messages,match", [
    ([{"content": "x"}], r"messages\[0\]: missing field 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}],
     r"messages\[1\]: missing field 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
     r"messages\[1\]: field 'role' is 'robot'; valid roles: system, user, assistant, tool"),
    ([{"role": "user", "content": None}], r"messages\[0\]: field 'content' must be str"),
    ([{"role": "user", "content": ["part"]}], r"messages\[0\]: field 'content' must be str"),
    (["hello"], r"messages\[0\]: must be a dict"),
    ([{"role": "user", "content": "a", "tool_calls": []}],
     r"messages\[0\]: field 'tool_calls' only allowed on assistant"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"arguments": {}}]}],
     r"messages\[0\]: tool_calls\[0\]: missing str field 'name'"),
    ([{"role": "assistant", "tool_calls": [{"name": "f"}]}],
     r"messages\[0\]: tool_calls\[0\]: missing field 'arguments'"),
    ("not a list", "messages must be a list"),
])
def test_malformed_messages(messages, match):
  with pytest.raises(ValueError, match=match):
    render_chat(messages)


def test_tool_call_only_turn_may_omit_content():
  call = {"name": "f", "arguments": {"a": 1}}
  text = render_chat([{"role": "assistant", "tool_calls": [call]}])
  assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}'
                       "\n</tool_call><|im_end|>\n")


def test_unknown_template_and_bad_tools():
  with pytest.raises(ValueError, match="unknown template 'chatml'; valid templates: kat, qwen2.5"):
    render_chat([], template="chatml")
  with pytest.raises(ValueError, match=r"tools\[0\]: must be a dict"):
    render_chat([{"role": "user", "content": "x"}], tools=["get_weather"])
