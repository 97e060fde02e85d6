"""Tests for kat_jax.data.tokenizer: Qwen2.5 ids, added tokens, byte tokenizer."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from kat_jax.data import tokenizer as tok_lib
from kat_jax.data.tokenizer import (ADDED_TOKENS, KAT_TAGS, ByteTokenizer,
                                    QwenTokenizer, get_tokenizer, kat_tag_ids)


@pytest.fixture(scope="module")
def qwen() -> QwenTokenizer:
  return get_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def byte() -> ByteTokenizer:
  return get_tokenizer("bytes")


@pytest.fixture(scope="module", params=["qwen2.5", "bytes"])
def any_tok(request, qwen, byte):
  return qwen if request.param == "qwen2.5" else byte


# Known Qwen2/2.5 ids (the BPE vocabulary is shared by Qwen2, Qwen2.5, Qwen3 and
# DeepSeek-R1-Distill-Qwen). Sources, all public test/probe files found with the
# code search:
#  [a] a Mojo Qwen2 BPE test `tests/test_tokenizer.mojo` checked against llama.cpp
#      on DeepSeek-R1-Distill-Qwen-1.5B;
#  [b] a C++ gtest `bpe_tokenizer` test on models/Qwen3-0.6B;
#  [c] an SGLang-vs-vLLM "Phase 0 functional equivalence" probe table (Qwen3-VL-8B);
#  [d] a C++ Qwen3-ASR tokenizer test (vocab.json + merges.txt).
KNOWN_IDS = [
    ("Hello world", [9707, 1879]),  # [a][b][c][d]
    ("Hello", [9707]),  # [a]
    ("Hello, world! 123", [9707, 11, 1879, 0, 220, 16, 17, 18]),  # [a]
    ("1+1=", [16, 10, 16, 28]),  # [a]
    ("2+2=?", [17, 10, 17, 19884]),  # [a]
    ("What is the capital of France?", [3838, 374, 279, 6722, 315, 9625, 30]),  # [a]
    ("The capital of France is", [785, 6722, 315, 9625, 374]),  # [a]
    ("   leading spaces", [256, 6388, 12621]),  # [a]
    ("new\nline", [931, 198, 1056]),  # [a]
    ("café", [924, 58858]),  # [a]
    ("你好世界", [108386, 99489]),  # [a][c]
    ("It's a test. It's 'ok'. 100%",
     [2132, 594, 264, 1273, 13, 1084, 594, 364, 562, 4427, 220, 16, 15, 15, 4]),  # [a]
    ("Hello\nworld", [9707, 198, 14615]),  # [b]
    ("<|im_start|>user\nHi<|im_end|>", [151644, 872, 198, 13048, 151645]),  # [b]
    ("<|im_start|><|im_end|>", [151644, 151645]),  # [b]
    ("def foo(): return 42", [750, 15229, 4555, 470, 220, 19, 17]),  # [c]
    ("🚀", [145836]),  # [c]
    ("system\n", [8948, 198]),  # [d]
    ("assistant\n", [77091, 198]),  # [d]
    ("这是上下文。", [100346, 102285, 16744, 1773]),  # [d]
    ("Qwen3-ASR: test 123!", [48, 16948, 18, 12, 1911, 49, 25, 1273, 220, 16, 17, 18, 0]),  # [d]
]

# Qwen2.5 added tokens 151643..151664 (docs/spec.md §1.4) and the KAT tags after them.
QWEN25_ADDED_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
KAT_IDS = {"<judge>": 151665, "</judge>": 151666, "<think_on>": 151667,
           "<think_off>": 151668, "<think>": 151669, "</think>": 151670,
           "<answer>": 151671, "</answer>": 151672}

ROUND_TRIP_TEXTS = [
    "",
    "plain ascii text",
    "Ünïcödé — “quotes” ½ ß ﬁ Ω 東京 مرحبا नमस्ते",
    "emoji: 🚀👩‍👩‍👧‍👦🏳️‍🌈 and flags 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn [i**2 for i in range(10)]  # comment\n",
    "   \n\n\t  \r\n  trailing spaces   \n\n\n",
    "numbers 1234567890 3.14159 -1e-9",
    "<|im_start|>user\n<judge>\nmixed <think_on> tags</answer><|im_end|>",
    "not a tag: <|im_start |> <judge > <thinking>",
]


# ---- Qwen2.5 ids --------------------------------------------------------------


@pytest.mark.parametrize("text,ids", KNOWN_IDS)
def test_qwen_known_ids(qwen, text, ids):
  assert qwen.encode(text) == ids
  assert qwen.decode(ids) == text


def test_qwen_digits_are_split_one_per_token(qwen):
  ids = qwen.encode("31415926")
  assert len(ids) == 8
  assert [qwen.decode([i]) for i in ids] == list("31415926")


def test_qwen_added_token_ids(qwen):
  for name, token_id in {**QWEN25_ADDED_IDS, **KAT_IDS}.items():
    assert qwen.token_to_id(name) == token_id
    assert qwen.id_to_token(token_id) == name
    assert qwen.encode(name) == [token_id]
  assert kat_tag_ids(qwen) == KAT_IDS
  assert qwen.vocab_size == 151673
  assert qwen.special_ids == frozenset(range(151643, 151673))


def test_qwen_named_ids(qwen):
  assert (qwen.pad_id, qwen.eos_id, qwen.im_start_id, qwen.im_end_id) == (
      151643, 151643, 151644, 151645)
  assert qwen.stop_ids == (151643, 151645)  # KAT-V1 stop_token_ids


def test_qwen_byte_level_vocab_strings(qwen):
  # HF vocab.json spells BPE tokens in the GPT-2 byte alphabet ('Ġ' = space).
  assert qwen.id_to_token(1879) == "Ġworld"
  assert qwen.token_to_id("Ġworld") == 1879
  assert qwen.id_to_token(198) == "Ċ"  # "\n"
  assert qwen.token_to_id("Hello") == 9707
  assert qwen.token_bytes(1879) == b" world"


def test_qwen_ranks_are_contiguous():
  ranks = tok_lib._load_qwen25_ranks()
  assert len(ranks) == 151643
  assert sorted(ranks.values()) == list(range(151643))


def test_qwen_nfc_normalisation(qwen):
  decomposed = "cafe\u0301"  # e + combining acute
  assert qwen.encode(decomposed) == qwen.encode("café") == [924, 58858]
  assert qwen.decode(qwen.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)


# ---- both tokenizers ----------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(any_tok, text):
  ids = any_tok.encode(text)
  assert all(0 <= i < any_tok.vocab_size for i in ids)
  # Qwen NFC-normalises like HF; the byte tokenizer is lossless.
  expected = text if isinstance(any_tok, ByteTokenizer) else unicodedata.normalize("NFC", text)
  assert any_tok.decode(ids) == expected
  assert any_tok.decode(any_tok.encode(text, allow_special=False)) == (
      any_tok.decode(ids))


def test_byte_round_trip_is_lossless(byte):
  text = "cafe\u0301 \x00\x7f"
  assert byte.encode(text)[:5] == list(b"cafe\xcc"[:5])
  assert byte.decode(byte.encode(text)) == text


def test_added_tokens_same_order_in_both(qwen, byte):
  assert byte.vocab_size == 256 + len(ADDED_TOKENS) == 286
  for k, (name, _) in enumerate(ADDED_TOKENS):
    assert qwen.token_to_id(name) == 151643 + k
    assert byte.token_to_id(name) == 256 + k
  assert byte.token_to_id("<judge>") == 256 + 22
  assert kat_tag_ids(byte) == {t: 278 + k for k, t in enumerate(KAT_TAGS)}
  assert byte.special_ids == frozenset(range(256, 286))
  assert (byte.pad_id, byte.eos_id, byte.im_start_id, byte.im_end_id) == (256, 256, 257, 258)
  assert byte.stop_ids == (256, 258)


def test_special_tokens_single_ids_only_when_allowed(any_tok):
  text = "a<|im_start|>b<judge>c</answer>"
  ids = any_tok.encode(text)
  im_start = any_tok.im_start_id
  judge = any_tok.token_to_id("<judge>")
  answer_end = any_tok.token_to_id("</answer>")
  assert ids.count(im_start) == 1 and ids.count(judge) == 1 and ids[-1] == answer_end
  plain = any_tok.encode(text, allow_special=False)
  assert not set(plain) & any_tok.special_ids
  assert any_tok.decode(plain) == text


def test_adjacent_tags(any_tok):
  tags = "".join(KAT_TAGS)
  assert any_tok.encode(tags) == [any_tok.token_to_id(t) for t in KAT_TAGS]


def test_decode_skip_special_keeps_non_special_added_tokens(any_tok):
  text = "<|im_start|>assistant\n<judge>\nx\n</judge><tool_call><|im_end|><|endoftext|>"
  ids = any_tok.encode(text)
  # HF semantics: special=True tokens vanish; tool/FIM/KAT tags stay visible.
  assert any_tok.decode(ids, skip_special=True) == "assistant\n<judge>\nx\n</judge><tool_call>"
  assert any_tok.skipped_ids == frozenset(
      any_tok.token_to_id(n) for n, special in ADDED_TOKENS if special)


def test_decode_accepts_numpy_ids(any_tok):
  ids = np.asarray(any_tok.encode("héllo <think>"), np.int32)
  assert any_tok.decode(ids) == "héllo <think>"


def test_decode_partial_utf8_is_replaced(any_tok):
  # The lone lead byte of a 4-byte char (both vocabularies have it as a token).
  lead = any_tok.token_to_id(tok_lib.bytes_to_token_string(b"\xf0"))
  assert any_tok.decode([lead]) == "\ufffd"
  assert any_tok.decode([lead] + any_tok.encode("ok")) == "\ufffdok"


def test_id_to_token_round_trip(any_tok):
  for token_id in [0, 10, 200, 255, any_tok.vocab_size - 1]:
    assert any_tok.token_to_id(any_tok.id_to_token(token_id)) == token_id


# ---- errors -------------------------------------------------------------------


def test_get_tokenizer_unknown_name():
  with pytest.raises(ValueError, match=r"unknown tokenizer 'gpt2'.*qwen2\.5, bytes"):
    get_tokenizer("gpt2")


@pytest.mark.parametrize("bad", [[-1], [10**7], ["a"]])
def test_decode_rejects_bad_ids(any_tok, bad):
  with pytest.raises(ValueError, match="token id"):
    any_tok.decode(bad)


def test_decode_rejects_id_past_vocab(any_tok):
  with pytest.raises(ValueError, match=rf"outside \[0, {any_tok.vocab_size}\)"):
    any_tok.decode([any_tok.vocab_size])


def test_encode_rejects_non_str(any_tok):
  with pytest.raises(ValueError, match="text must be str"):
    any_tok.encode(b"bytes")


def test_unknown_token_string(any_tok):
  with pytest.raises(ValueError, match="unknown token"):
    any_tok.token_to_id("<not_a_token>")
