"""Cold-start SFT examples in the report's templates (KAT-V1 report Tables 2-3; docs/spec.md §7.1).

  think_on:  <judge> {judge} </judge> <think_on> <think> {think} </think>
             <answer> {answer} </answer>
  think_off: <judge> {judge} </judge> <think_off> <answer> {answer} </answer>

laid out with KAT's newlines by `chat_template.format_autothink_response` and rendered with the
KAT chat template, whose generation prompt ends with `<judge>\\n`.

Loss weights per segment of the assistant turn. Every assistant token falls in one segment:

  prompt  system/user turns, the `<|im_start|>assistant\\n<judge>\\n` header     weight 0
  judge   the rationale and `</judge>`                                          w_judge
  mode    `\\n\\n<think_on>\\n` or `\\n\\n<think_off>\\n`                             w_mode
  think   `<think>` ... `</think>\\n`                                             w_think
  answer  `<answer>` ... `</answer>`, `<|im_end|>` and the appended EOS          w_answer

(the newline between `<|im_end|>` and the EOS is template scaffolding, weight 0).

In stage 1 the mode tags are externally supplied triggers kept out of the loss (seed §3); from
the cold start on (§4.1) the model writes judge and mode itself, so `mode` is trained (default
1.0). Set `mode=0` to reproduce the stage-1 trigger handling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from kat_jax.data import chat_template
from kat_jax.data.packing import Document
from kat_jax.data.tokenizer import Tokenizer

SEGMENTS = ("prompt", "judge", "mode", "think", "answer")
PROMPT, JUDGE, MODE, THINK, ANSWER = range(len(SEGMENTS))


@dataclasses.dataclass(frozen=True)
class SegmentWeights:
  """Loss weight of each segment of an AutoThink response (the prompt is never trained)."""
  judge: float = 1.0
  mode: float = 1.0
  think: float = 1.0
  answer: float = 1.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not np.isfinite(value) or value < 0:
        raise ValueError(f"segment weight {f.name} must be finite and >= 0, got {value}")

  def table(self) -> np.ndarray:
    """[len(SEGMENTS)] float32, indexed by segment id."""
    return np.asarray([0.0, self.judge, self.mode, self.think, self.answer], np.float32)


def sft_messages(prompt: str, mode: str, judge: str, answer: str,
                 think: str | None = None, system: str | None = None) -> list[dict[str, str]]:
  """Chat messages of one cold-start example (think is dropped for think_off)."""
  response = chat_template.format_autothink_response(
      judge, mode, answer, think if mode == "think_on" else None)
  messages = [{"role": "system", "content": system}] if system is not None else []
  return messages + [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": response}]


def segment_ids(tokenizer: Tokenizer, messages: list[Mapping[str, Any]], *,
                tools: list[Mapping[str, Any]] | None = None, add_eos: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [T] int32, segment id [T] int32) of a chat whose last turn is an AutoThink answer.

  Earlier assistant turns are history (KAT reduces them to their answers) and count as prompt.
  """
  if not messages or messages[-1].get("role") != "assistant":
    raise ValueError("an SFT chat must end with an assistant message")
  chat = chat_template.tokenize_chat(tokenizer, messages, tools=tools or None, template="kat",
                                     keep_last_reasoning=True)
  span = [s for s in chat.spans if s.role == "assistant"][-1]
  tokens = np.asarray(chat.ids + ([tokenizer.eos_id] if add_eos else []), np.int32)
  seg = np.full(tokens.shape, PROMPT, np.int32)
  tag = {name: tokenizer.token_to_id(name) for name in
         ("</judge>", "<think_on>", "<think_off>", "<think>", "<answer>")}
  current = JUDGE
  for t in range(span.start, span.end):
    token = int(tokens[t])
    if token in (tag["<think_on>"], tag["<think_off>"]) and current == JUDGE:
      _relabel_trailing_whitespace(tokenizer, tokens, seg, t, JUDGE, MODE)
      current = MODE
    elif token == tag["<think>"]:
      current = THINK
    elif token == tag["<answer>"]:
      current = ANSWER
    seg[t] = current
  if add_eos:  # as in pipeline.record_to_document: the EOS is trained, the newline before not
    seg[-1] = ANSWER
  return tokens, seg


def _relabel_trailing_whitespace(tokenizer: Tokenizer, tokens: np.ndarray, seg: np.ndarray,
                                 t: int, old: int, new: int) -> None:
  """Moves the blank line between `</judge>` and the mode tag into the mode segment."""
  i = t - 1
  while i >= 0 and seg[i] == old and not tokenizer.token_bytes(int(tokens[i])).strip():
    seg[i] = new
    i -= 1


def response_fields(record: Mapping[str, Any]) -> tuple[str, str, str, str | None]:
  """(mode, judge, answer, think) of a tagged task record, ValueError if incomplete."""
  mode = record.get("mode")
  if mode not in ("think_on", "think_off"):
    raise ValueError(f"record {record.get('id', '?')!r}: 'mode' must be think_on or think_off,"
                     f" got {mode!r}")
  judge = record.get("judge")
  judge_text = judge.get(mode) if isinstance(judge, Mapping) else judge
  if not isinstance(judge_text, str):
    raise ValueError(f"record {record.get('id', '?')!r}: no judge rationale for {mode}")
  think = record.get("think") if mode == "think_on" else None
  if mode == "think_on" and not isinstance(think, str):
    raise ValueError(f"record {record.get('id', '?')!r}: think_on needs a 'think' trace")
  return mode, judge_text, record["answer"], think


def sft_record(task_record: Mapping[str, Any]) -> dict[str, Any]:
  """A tagged task record -> {"messages", "mode", "domain", "regime", "id"} for SFT."""
  mode, judge, answer, think = response_fields(task_record)
  return {"id": task_record.get("id"), "mode": mode,
          "domain": task_record.get("domain"), "regime": task_record.get("regime"),
          "messages": sft_messages(task_record["prompt"], mode, judge, answer, think)}


def sft_document(record: Mapping[str, Any], tokenizer: Tokenizer,
                 weights: SegmentWeights = SegmentWeights(), *, add_eos: bool = True
                 ) -> Document:
  """An SFT chat record -> Document whose loss_mask holds per-segment float weights."""
  messages = record.get("messages")
  if not isinstance(messages, list):
    raise ValueError(f"SFT record {record.get('id', '?')!r} has no 'messages' list")
  tokens, seg = segment_ids(tokenizer, messages, tools=record.get("tools"), add_eos=add_eos)
  return Document(tokens, weights.table()[seg])
