"""The Qwen2.5 + KAT tokenizer written as HF files: merges recovered from ranks, same ids."""

import pytest
import transformers

from kat_jax.data import hf_tokenizer
from kat_jax.data.tokenizer import get_tokenizer


def test_last_merge_replays_bpe_with_lower_ranks_only():
  ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"ca": 6, b"abca": 7}
  assert hf_tokenizer._last_merge(b"ab", ranks) == (b"a", b"b")
  assert hf_tokenizer._last_merge(b"abc", ranks) == (b"ab", b"c")  # "ab" (3) before "bc" (4)
  assert hf_tokenizer._last_merge(b"abca", ranks) == (b"abc", b"a")
  with pytest.raises(ValueError, match="not reachable"):
    hf_tokenizer._last_merge(b"cccc", {**ranks, b"cccc": 8})  # no "cc" to start from


def test_transformers_loads_the_written_files_with_our_ids(tmp_path):
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
