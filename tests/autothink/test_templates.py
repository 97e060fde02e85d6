"""Cold-start templates (report Tables 2-3) and per-segment loss weights, token by token."""

from __future__ import annotations

import numpy as np
import pytest

from kat_jax.autothink import templates
from kat_jax.data.tokenizer import get_tokenizer

TOK = get_tokenizer("bytes")
W = templates.SegmentWeights(judge=0.5, mode=2.0, think=0.25, answer=1.5)


def _record(mode):
  task = {"id": "t", "prompt": "Compute (2 + 3) * 4.", "answer": "20",
          "think": "2 + 3 = 5. 5 * 4 = 20.",
          "judge": {"think_on": "Two steps; think.", "think_off": "Easy; answer."}, "mode": mode,
          "domain": "math", "regime": "hard"}
  return templates.sft_record(task)


def _segments_text(record):
  tokens, seg = templates.segment_ids(TOK, record["messages"])
  return {name: TOK.decode(tokens[seg == i].tolist()) for i, name in enumerate(templates.SEGMENTS)}


def test_table2_layout_both_modes():
  on = _record("think_on")["messages"][-1]["content"]
  off = _record("think_off")["messages"][-1]["content"]
  assert on == ("<judge>\nTwo steps; think.\n</judge>\n\n<think_on>\n<think>\n"
                "2 + 3 = 5. 5 * 4 = 20.\n</think>\n<answer>\n20\n</answer>")
  assert off == "<judge>\nEasy; answer.\n</judge>\n\n<think_off>\n<answer>\n20\n</answer>"


def test_segments_cover_the_response_in_order():
  text = _segments_text(_record("think_on"))
  assert text["prompt"].endswith("<|im_start|>assistant\n<judge>\n\n")  # + newline before EOS
  assert "Compute (2 + 3) * 4." in text["prompt"]
  assert text["judge"] == "Two steps; think.\n</judge>"
  assert text["mode"] == "\n\n<think_on>\n"
  assert text["think"] == "<think>\n2 + 3 = 5. 5 * 4 = 20.\n</think>\n"
  assert text["answer"] == "<answer>\n20\n</answer><|im_end|><|endoftext|>"
  off = _segments_text(_record("think_off"))
  assert off["mode"] == "\n\n<think_off>\n" and off["think"] == ""
  assert off["answer"] == "<answer>\n20\n</answer><|im_end|><|endoftext|>"


@pytest.mark.parametrize("mode", ["think_on", "think_off"])
def test_token_weights_per_segment(mode):
  record = _record(mode)
  doc = templates.sft_document(record, TOK, W)
  tokens, seg = templates.segment_ids(TOK, record["messages"])
  np.testing.assert_array_equal(doc.tokens, tokens)
  expected = np.asarray([0.0, 0.5, 2.0, 0.25, 1.5], np.float32)[seg]
  np.testing.assert_array_equal(doc.loss_mask, expected)
  ids = doc.tokens.tolist()
  mode_tag = ids.index(TOK.token_to_id(f"<{mode}>"))
  assert doc.loss_mask[mode_tag] == 2.0
  assert doc.loss_mask[ids.index(TOK.token_to_id("</judge>"))] == 0.5
  assert doc.loss_mask[ids.index(TOK.token_to_id("</answer>"))] == 1.5
  assert doc.loss_mask[-1] == 1.5 and ids[-1] == TOK.eos_id
  if mode == "think_on":
    assert doc.loss_mask[ids.index(TOK.token_to_id("</think>"))] == 0.25
  # The prompt, including the prefilled `<judge>\n`, is never trained.
  judge_open = ids.index(TOK.token_to_id("<judge>"))
  assert not doc.loss_mask[:judge_open + 2].any()


def test_stage1_style_trigger_excluded_with_zero_mode_weight():
  doc = templates.sft_document(_record("think_on"), TOK, templates.SegmentWeights(mode=0.0))
  ids = doc.tokens.tolist()
  assert doc.loss_mask[ids.index(TOK.token_to_id("<think_on>"))] == 0.0
  assert doc.loss_mask[ids.index(TOK.token_to_id("<think>"))] == 1.0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="mode"):
    templates.sft_record({"id": "t", "prompt": "p", "answer": "a", "judge": "j", "mode": "maybe"})
  with pytest.raises(ValueError, match="think"):
    templates.sft_record({"id": "t", "prompt": "p", "answer": "a", "judge": "j",
                          "mode": "think_on"})
  with pytest.raises(ValueError, match="weight"):
    templates.SegmentWeights(judge=-1.0)
  with pytest.raises(ValueError, match="end with an assistant"):
    templates.segment_ids(TOK, [{"role": "user", "content": "hi"}])
