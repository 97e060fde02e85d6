"""Generation for tagging and evaluation: a kat_jax model as a `GenerateFn`, and the AutoThink
evaluation of a model on held-out dual-regime tasks (format rate, think-on rate easy vs hard).

Generation goes through `kat_jax.sampling.generate_fn.model_generate_fn` (the rollout engine by
default); any `GenerateFn` (list of user queries -> list of responses) can be passed instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kat_jax.tasks import verifiers
from kat_jax.autothink.tagging import GenerateFn
from kat_jax.tasks.dual_regime import REGIMES, Task
from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.model.config import ModelConfig
from kat_jax.progress import Progress


def kat_generate_fn(params: Any, model_config: ModelConfig, tokenizer: Tokenizer, *,
                    think_mode: str = "off", max_new_tokens: int = 160,
                    temperature: float = 1.0, batch_size: int = 64, seed: int = 0
                    ) -> GenerateFn:
  """A GenerateFn over a kat_jax model with the KAT template.

  think_mode: 'off' / 'on' force the mode by prefilling (for tagging: 'off'); 'auto' lets the
  model judge and choose. Responses are the assistant text after the generation prompt's
  `<judge>\\n`, the forced prefill included, so `parse_autothink_response(r,
  judge_prefilled=True)` reads them. Each call draws fresh randomness. (The sampling itself
  is `kat_jax.sampling.generate_fn.model_generate_fn`, which also counts tokens.)
  """
  # pylint: disable-next=g-import-not-at-top  (sampling pulls in the decode machinery)
  from kat_jax.sampling.generate_fn import model_generate_fn
  counting = model_generate_fn(params, model_config, tokenizer, think_mode=think_mode,
                               max_new_tokens=max_new_tokens, temperature=temperature,
                               batch_size=batch_size, seed=seed)
  return lambda prompts: counting(prompts)[0]


def _rate(values: Sequence[bool]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def evaluate_autothink(generate_fn: GenerateFn, tasks: Sequence[Task], *,
                       time_limit: float = 2.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Lets the model choose its mode on `tasks`; returns (summary, per-task rows).

  generate_fn: think_mode 'auto' responses (text after `<judge>\\n`).
  Summary: format_rate (exact Table 2 layout), think_on_rate overall and per regime
  (think_on_rate_easy / _hard), no_mode_rate, accuracy overall / per regime / per mode.
  """
  if not tasks:
    raise ValueError("evaluate_autothink needs at least one task")
  responses = generate_fn([t.prompt for t in tasks])
  parsed = [parse_autothink_response(r, judge_prefilled=True) for r in responses]
  with Progress("autothink eval: answers scored", len(tasks), unit="answers") as progress:
    correct = verifiers.verify_many([t.verifier for t in tasks],
                                    [p["answer"] for p in parsed], time_limit=time_limit,
                                    progress=progress)
  rows = [{"id": t.id, "regime": t.regime, "kind": t.kind, "prompt": t.prompt,
           "response": r, "mode": p["mode"], "well_formed": p["well_formed"], "correct": c}
          for t, r, p, c in zip(tasks, responses, parsed, correct)]
  summary: dict[str, Any] = {
      "num_prompts": len(rows),
      "format_rate": _rate([r["well_formed"] for r in rows]),
      "think_on_rate": _rate([r["mode"] == "think_on" for r in rows]),
      "no_mode_rate": _rate([r["mode"] is None for r in rows]),
      "accuracy": _rate([r["correct"] for r in rows]),
  }
  for regime in REGIMES:
    picked = [r for r in rows if r["regime"] == regime]
    summary[f"num_{regime}"] = len(picked)
    summary[f"think_on_rate_{regime}"] = _rate([r["mode"] == "think_on" for r in picked])
    summary[f"format_rate_{regime}"] = _rate([r["well_formed"] for r in picked])
    summary[f"accuracy_{regime}"] = _rate([r["correct"] for r in picked])
  for mode in ("think_on", "think_off"):
    summary[f"accuracy_{mode}"] = _rate([r["correct"] for r in rows if r["mode"] == mode])
  return summary, rows
