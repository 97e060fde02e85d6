"""The Qwen2.5 + KAT tokenizer written as HF files: merges recovered from ranks, same ids, and
the KAT chat template in Jinja rendering as `render_chat`."""

import pytest
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

from kat_jax.data import hf_tokenizer
from kat_jax.data.chat_template import render_chat
from kat_jax.data.tokenizer import get_tokenizer


def test_last_merge_replays_bpe_with_lower_ranks_only():
  ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"ca": 6, b"abca": 7}
  assert hf_tokenizer._last_merge(b"ab", ranks) == (b"a", b"b")
  assert hf_tokenizer._last_merge(b"abc", ranks) == (b"ab", b"c")  # "ab" (3) before "bc" (4)
  assert hf_tokenizer._last_merge(b"abca", ranks) == (b"abc", b"a")
  with pytest.raises(ValueError, match="not reachable"):
    hf_tokenizer._last_merge(b"cccc", {**ranks, b"cccc": 8})  # no "cc" to start from


def test_transformers_loads_the_written_files_with_our_ids_and_chat_template(tmp_path):
  files = hf_tokenizer.save_qwen_tokenizer(str(tmp_path))
  assert sorted(files) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
  ours = get_tokenizer("qwen2.5")
  assert len(theirs) == ours.vocab_size == 151673
  texts = ["Hello world! 12345 and 3.14159", "<judge>\nhard</judge>\n<think_on>\n<think>x</think>",
           "中文字符 和 émojis 🎉\n\n  spaces\t\ttabs", "<|im_start|>user\n2+3?<|im_end|>\n",
           "def f(x):\n    return x**2  # café ＡＢＣ"]
  for text in texts:
    ids = ours.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == ids, text
    assert theirs.decode(ids) == ours.decode(ids)
  messages = [{"role": "user", "content": "What is 2+3?"}]
  assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
      render_chat(messages, template="kat", add_generation_prompt=True))


_TOOLS = [{"type": "function", "function": {"name": "add", "description": "a + b",
                                             "parameters": {"type": "object"}}}]
_CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2+3?"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "<judge>\neasy\n</judge>\n\n<think_off>\n<answer>\n"
                                       "hello\n</answer>"},
      {"role": "user", "content": "and 7*6?"},
      {"role": "assistant", "content": "<judge>\nhard\n</judge>\n\n<think_on>\n<think>\n6*7"
                                       "\n</think>\n<answer>\n42\n</answer>"},
      {"role": "user", "content": "thanks"}], None),
    ([{"role": "user", "content": "add 1 and 2"},
      {"role": "assistant", "content": "",
       "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                      {"function": {"name": "add", "arguments": '{"a": 3, "b": 4}'}}]},
      {"role": "tool", "content": "3"}, {"role": "tool", "content": "7"},
      {"role": "user", "content": "ünïcode"}], _TOOLS),
    ([{"role": "system", "content": "You run tools."}, {"role": "user", "content": "x"},
      {"role": "assistant", "content": "calling", "tool_calls": [
          {"name": "add", "arguments": {"a": "é"}}]}, {"role": "tool", "content": "r"}], _TOOLS),
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(_CONVERSATIONS)))
def test_jinja_kat_template_renders_as_render_chat(index, generation_prompt):
  messages, tools = _CONVERSATIONS[index]
  rendered, _ = render_jinja_template([messages], tools=tools,
                                      chat_template=hf_tokenizer.KAT_CHAT_TEMPLATE,
                                      add_generation_prompt=generation_prompt)
  assert rendered[0] == render_chat(messages, tools=tools, template="kat",
                                    add_generation_prompt=generation_prompt)
