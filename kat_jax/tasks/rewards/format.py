"""Format reward: is the response a well-formed AutoThink answer (docs/spec.md §7.1)?

Well-formed means the exact layout of `format_autothink_response` (checked by
`parse_autothink_response`), plus mode rules: a non-empty judge and answer; think-on needs a
non-empty think block; an optional required mode (e.g. the mode the data tagged).
"""

from __future__ import annotations

from kat_jax.data.chat_template import parse_autothink_response

MODES = ("think_on", "think_off")


def format_problems(response: str, *, judge_prefilled: bool = False,
                    required_mode: str | None = None) -> list[str]:
  """Everything wrong with the response's AutoThink format ([] when it is fine)."""
  if required_mode is not None and required_mode not in MODES:
    raise ValueError(f"required_mode must be one of {MODES} or None, got {required_mode!r}")
  parsed = parse_autothink_response(response, judge_prefilled=judge_prefilled)
  problems = []
  if not parsed["well_formed"]:
    problems.append("layout does not match the AutoThink template")
  if not (parsed["judge"] or "").strip():
    problems.append("empty or missing judge")
  if parsed["mode"] is None:
    problems.append("no <think_on>/<think_off> mode tag")
  elif parsed["mode"] == "think_on" and not (parsed["think"] or "").strip():
    problems.append("think_on without reasoning")
  if not (parsed["answer"] or "").strip():
    problems.append("empty or missing answer")
  if required_mode is not None and parsed["mode"] != required_mode:
    problems.append(f"mode {parsed['mode']} but {required_mode} required")
  return problems


def format_reward(response: str, *, judge_prefilled: bool = False,
                  required_mode: str | None = None) -> float:
  """1.0 for a well-formed AutoThink response (see `format_problems`), else 0.0."""
  return 0.0 if format_problems(response, judge_prefilled=judge_prefilled,
                                required_mode=required_mode) else 1.0
