"""Stage-1 dual-regime (think-on / think-off) chat records from the AutoThink task generator.

The tasks come from `kat_jax.tasks.dual_regime` (the project's one dual-regime generator: easy
queries that need no reasoning, hard ones with a worked trace, each with domain, regime and
difficulty). Here they are only rendered for KAT stage 1 (report §3.2; docs/spec.md §7.1)::

  {"messages": [{"role": "system", "content": "Answer."},
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": "<think_on>\\n<think>\\n...\\n</think>\\n"
                                                 "<answer>\\n...\\n</answer>"}],
   "mode": "think_on" | "think_off", "domain": ..., "difficulty": int, "regime": ..., "id": ...}

Mode by regime: hard -> think_on (with the task's trace), easy -> think_off. In stage 1 the mode
trigger (`<think_on>` / `<think_off>`, one token in both tokenizers) is supplied with the input
and excluded from the loss: `dual_regime_document` zeroes its weight. There is no judge block
yet (the model writes judge and mode itself only from the cold start on; see
`kat_jax.autothink.templates` for that layout, which this one follows minus the judge).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kat_jax.tasks import dual_regime as tasks
from kat_jax.data import chat_template
from kat_jax.data.packing import Document
from kat_jax.data.tokenizer import Tokenizer, kat_tag_ids

MODES = ("think_on", "think_off")
MODE_OF_REGIME = {"hard": "think_on", "easy": "think_off"}
SYSTEM_PROMPT = "Answer."  # short: the byte tokenizer spends one token per character


def assistant_content(mode: str, answer: str, think: str | None = None) -> str:
  """Stage-1 assistant text: trigger, optional think block, answer block."""
  if mode == "think_on":
    if think is None:
      raise ValueError("mode 'think_on' needs a think trace")
    return f"<think_on>\n<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"
  if mode == "think_off":
    return f"<think_off>\n<answer>\n{answer}\n</answer>"
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def task_record(task: tasks.Task) -> dict[str, Any]:
  """One AutoThink task -> a stage-1 chat record (mode chosen by the task's regime)."""
  if task.regime not in MODE_OF_REGIME:
    raise ValueError(f"task {task.id!r}: regime must be one of {sorted(MODE_OF_REGIME)}, got "
                     f"{task.regime!r} (user tasks need tagging first)")
  mode = MODE_OF_REGIME[task.regime]
  content = assistant_content(mode, task.answer, task.think if mode == "think_on" else None)
  return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                       {"role": "user", "content": task.prompt},
                       {"role": "assistant", "content": content}],
          "mode": mode, "domain": task.domain, "difficulty": task.difficulty,
          "regime": task.regime, "id": task.id}


def generate_records(num: int, seed: int, think_on_fraction: float = 0.35
                     ) -> list[dict[str, Any]]:
  """`num` records of AutoThink task stream `seed`; hard (think_on) with probability
  `think_on_fraction` (KAT report: 34.8% think-on)."""
  return [task_record(t)
          for t in tasks.generate_tasks(num, seed, hard_fraction=think_on_fraction)]


def trigger_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  tags = kat_tag_ids(tokenizer)
  return tags["<think_on>"], tags["<think_off>"]


def dual_regime_document(record: dict[str, Any], tokenizer: Tokenizer, *,
                         add_eos: bool = True) -> Document:
  """KAT-template tokens of a chat record; assistant tokens trained except the mode trigger.

  Works for any chat record (the trigger mask is a no-op without triggers); plain text
  records fall back to `pipeline.record_to_document`.
  """
  if "messages" not in record:
    from kat_jax.data.pipeline import record_to_document  # pylint: disable=g-import-not-at-top
    return record_to_document(record, tokenizer, add_eos=add_eos)
  chat = chat_template.tokenize_chat(tokenizer, record["messages"], template="kat",
                                     keep_last_reasoning=True)
  tokens = np.asarray(chat.ids, np.int32)
  mask = chat.loss_mask(("assistant",)).astype(np.float32)
  mask[np.isin(tokens, trigger_ids(tokenizer))] = 0.0  # input, not target (report §3.1)
  if add_eos:
    tokens = np.append(tokens, np.int32(tokenizer.eos_id))
    mask = np.append(mask, np.float32(1.0))
  return Document(tokens, mask)


class DualRegimeToDocument:
  """Picklable record -> Document callable for grain."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, record: dict[str, Any]) -> Document:
    return dual_regime_document(record, self.tokenizer)
