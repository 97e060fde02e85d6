"""Multiple-choice, AutoThink format and general heuristic rewards."""

from __future__ import annotations

import pytest

from kat_jax.data.chat_template import format_autothink_response
from kat_jax.tasks.rewards import choice, format as format_lib, general


def _off(answer: str) -> str:
  return format_autothink_response("easy", "think_off", answer)


@pytest.mark.parametrize("response,expected", [
    (_off("B"), "B"),
    (_off("(C) 30 km/h"), "C"),
    (_off("**D.** because the force is larger"), "D"),
    (_off("b) 12"), "B"),
    (_off("I think about it.\nAnswer: $A$"), "A"),
    (_off("The answer is (C)."), "C"),
    (_off("\\boxed{D}"), "D"),
    ("Reasoning...\nAnswer: B", "B"),
    (_off("All options look plausible."), None),
    (_off("Answer: Z"), None),
])
def test_extract_choice(response, expected):
  assert choice.extract_choice(response, letters="ABCD") == expected


def test_choice_reward_first_letter_of_answer_block_only():
  response = format_autothink_response("hard", "think_on", "B) 12",
                                       think="A looks tempting. Answer: A")
  assert choice.choice_reward(response, "B") == 1.0
  assert choice.choice_reward(response, "a") == 0.0
  with pytest.raises(ValueError, match="single option letter"):
    choice.choice_reward(response, "AB")


def test_format_reward():
  on = format_autothink_response("needs steps", "think_on", "42", think="6 * 7")
  assert format_lib.format_reward(on) == 1.0
  assert format_lib.format_reward(_off("Paris")) == 1.0
  assert format_lib.format_reward(on, required_mode="think_off") == 0.0
  assert format_lib.format_reward(on[len("<judge>\n"):], judge_prefilled=True) == 1.0
  broken = on.replace("</think>", "")
  assert format_lib.format_reward(broken) == 0.0
  assert "layout does not match the AutoThink template" in format_lib.format_problems(broken)
  empty_think = "<judge>\nj\n</judge>\n\n<think_on>\n<think>\n \n</think>\n<answer>\n1\n</answer>"
  assert "think_on without reasoning" in format_lib.format_problems(empty_think)
  assert format_lib.format_reward("just an answer") == 0.0
  with pytest.raises(ValueError, match="required_mode"):
    format_lib.format_reward(on, required_mode="on")


def test_general_reward_heuristics():
  good = _off("Paris is the capital of France; it lies on the Seine.")
  assert general.general_reward(good) == 1.0
  assert general.general_reward(_off(" ")) == 0.0
  assert general.general_reward(good, max_chars=10) == 0.0
  loop = _off("I will now repeat myself again and again. " * 30)
  assert general.has_repetition_loop(general.answer_region(loop))
  assert general.general_reward(loop) == 0.0
  assert general.general_reward(good, reference="The capital of France is Paris.") == 1.0
  assert general.general_reward(good, reference="Berlin is in Germany.") == 0.0
  assert general.general_reward(good, keywords=["Seine", "Paris"]) == 1.0
  with pytest.raises(ValueError, match="min_chars"):
    general.general_reward(good, min_chars=5, max_chars=1)
