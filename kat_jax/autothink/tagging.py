"""Tagging: label domain and difficulty, and pick each query's mode by majority vote.

The vote (KAT-V1 report §3.2: queries are split into think-off / think-on "based on their
intrinsic complexity and the availability of verifiable answers"; §4.1.1: "a majority voting
mechanism across multiple model outputs to determine the preferred reasoning mode"):

  sample N answers to the query *without thinking* (think_off) and score each with the task's
  verifier; if a strict majority (> N/2) is correct the query does not need reasoning ->
  think_off, otherwise (ties included) -> think_on.

Then a fraction of the queries (1% in the report, `random_fraction` here) gets a uniformly random
mode regardless of the vote, so the model sees both modes across the query distribution (§4.1.1).

Answers come from a `GenerateFn`: user queries -> one think-off response each. Implementations:
`simulated_solver` (procedural, for the embedded data; no model needed), `kat_generate_fn` (a
kat_jax model through the KV-cache sampler, see `generation.py`) and `openai_generate_fn` (any
OpenAI-compatible `/v1/chat/completions` endpoint, through `kat_jax.openai_http`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kat_jax.tasks import verifiers
from kat_jax.tasks.dual_regime import Task
from kat_jax.data.chat_template import parse_autothink_response
from kat_jax.openai_http import post_json
from kat_jax.progress import Progress

GenerateFn = Callable[[list[str]], list[str]]
MODES = ("think_on", "think_off")
THINK_OFF_SYSTEM = ("Answer directly, without showing any reasoning. Reply with the final "
                    "answer only (code: only the function; multiple choice: only the letter).")


def extract_answer(response: str) -> str:
  """The answer part of a response: inside `<answer>` when tagged, else the whole text.

  A leading `<think>…</think>` block (reasoning models served over an OpenAI-compatible
  endpoint reply `<think>…</think>answer` even when asked not to think) is dropped first; a
  `<think>` never closed (cut off by max_tokens) leaves no answer: ''.
  """
  stripped = response.lstrip()
  if stripped.startswith("<think>"):
    if "</think>" not in stripped:
      return ""
    response = stripped.split("</think>", 1)[1]
  if "<answer>" in response or "<judge>" in response:
    parsed = parse_autothink_response(response)
    if parsed["answer"] is not None:
      return parsed["answer"]
  return response.strip()


def vote_mode(num_correct: int, num_samples: int) -> str:
  """think_off iff a strict majority of the think-off samples is correct."""
  if num_samples < 1 or not 0 <= num_correct <= num_samples:
    raise ValueError(f"need 0 <= num_correct <= num_samples and num_samples >= 1, got "
                     f"{num_correct}/{num_samples}")
  return "think_off" if 2 * num_correct > num_samples else "think_on"


def difficulty_label(pass_rate: float) -> str:
  """Difficulty from the think-off pass rate: easy (>= 0.8), medium (> 0.5), hard."""
  if pass_rate >= 0.8:
    return "easy"
  return "medium" if pass_rate > 0.5 else "hard"


_DOMAIN_PATTERNS = (
    ("code", re.compile(r"\bdef |python|function|code|```|return\b", re.I)),
    ("math", re.compile(r"solve|compute|what is -?\d|\d\s*[-+*/^]\s*\d|equation|integer", re.I)),
    ("science", re.compile(r"\b(force|energy|mass|speed|voltage|density|atom|cell|gas|"
                           r"physics|chemistry|biology)\b", re.I)),
)


def infer_domain(prompt: str) -> str:
  """Keyword guess of a query's domain (for imported rows without a label); 'general' else."""
  for domain, pattern in _DOMAIN_PATTERNS:
    if pattern.search(prompt):
      return domain
  return "general"


def _as_record(task: Task | Mapping[str, Any]) -> dict[str, Any]:
  record = task.to_record() if isinstance(task, Task) else dict(task)
  for field in ("prompt", "verifier"):
    if field not in record:
      raise ValueError(f"task {record.get('id', '?')!r} misses field {field!r}")
  return record


def random_assignment(num_tasks: int, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(chosen [N] bool, random mode index [N] int) with exactly round(fraction*N) chosen."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"random_fraction must be in [0, 1], got {fraction}")
  rng = np.random.default_rng(seed)
  chosen = np.zeros(num_tasks, bool)
  chosen[rng.choice(num_tasks, int(round(fraction * num_tasks)), replace=False)] = True
  return chosen, rng.integers(0, 2, num_tasks)


def tag_tasks(tasks: Sequence[Task | Mapping[str, Any]], generate_fn: GenerateFn, *,
              num_samples: int = 5, random_fraction: float = 0.01, seed: int = 0,
              time_limit: float = 2.0, label: str = "tagging") -> list[dict[str, Any]]:
  """Task records + {"mode", "mode_source", "votes_correct", "votes", "pass_rate",
  "difficulty_label", "domain"} (domain inferred only where the task has none).

  generate_fn is called `num_samples` times with all prompts (sample diversity is its job:
  temperature > 0 for a model). `label` names the phase in the progress line.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  records = [_as_record(t) for t in tasks]
  prompts = [r["prompt"] for r in records]
  specs = [r["verifier"] for r in records]
  correct = np.zeros(len(records), np.int64)
  progress = Progress(f"{label}: think-off answers scored", num_samples * len(records),
                      unit="answers")
  # One pool for every sample: its SymPy worker processes start once, not once per sample.
  pool = verifiers.verifier_pool(time_limit)
  try:
    for _ in range(num_samples):
      responses = generate_fn(list(prompts))
      if len(responses) != len(prompts):
        raise ValueError(f"generate_fn returned {len(responses)} responses for "
                         f"{len(prompts)} prompts")
      answers = [extract_answer(r) if isinstance(r, str) else None for r in responses]
      correct += np.asarray(verifiers.verify_many(specs, answers, pool=pool,
                                                  progress=progress))
  finally:
    pool.close()
  progress.finish()
  chosen, random_modes = random_assignment(len(records), random_fraction, seed)
  tagged = []
  for i, record in enumerate(records):
    pass_rate = float(correct[i]) / num_samples
    if chosen[i]:
      mode, source = MODES[int(random_modes[i])], "random"
    else:
      mode, source = vote_mode(int(correct[i]), num_samples), "vote"
    tagged.append({**record, "mode": mode, "mode_source": source,
                   "votes_correct": int(correct[i]), "votes": num_samples,
                   "pass_rate": pass_rate, "difficulty_label": difficulty_label(pass_rate),
                   "domain": record.get("domain") or infer_domain(record["prompt"])})
  return tagged


# ---------------------------------------------------------------------------
# Procedural solver: the embedded data's stand-in for a think-off model
# ---------------------------------------------------------------------------


def wrong_answer(task: Task, rng: np.random.Generator) -> str:
  """A plausible but wrong answer of the task's kind."""
  kind = task.verifier["type"]
  if kind == "math":
    return str(int(task.verifier["value"]) + int(rng.choice([-2, -1, 1, 3])))
  if kind == "choice":
    return str(rng.choice([c for c in "ABCD" if c != task.verifier["key"]]))
  if kind == "code":
    return "def f(*args): return None\ndef h(*args): return None"
  return "I am not sure."


def simulated_solver(tasks: Sequence[Task], *, accuracy: Mapping[int, float] | None = None,
                     seed: int = 0) -> GenerateFn:
  """A GenerateFn that answers each known prompt correctly with probability
  `accuracy[difficulty]` (default {1: 0.9, 2: 0.2, 3: 0.1}), else wrongly.

  Stands in for sampling a think-off model: easy queries are mostly answered right without
  reasoning, multi-step ones mostly wrong, with per-sample noise so votes can split.
  """
  accuracy = dict(accuracy or {1: 0.9, 2: 0.2, 3: 0.1})
  by_prompt = {t.prompt: t for t in tasks}
  rng = np.random.default_rng(seed)

  def generate(prompts: list[str]) -> list[str]:
    out = []
    for prompt in prompts:
      task = by_prompt.get(prompt)
      if task is None:
        raise ValueError(f"simulated_solver knows no task with prompt {prompt[:60]!r}")
      p = accuracy.get(task.difficulty, min(accuracy.values()))
      out.append(task.answer if rng.random() < p else wrong_answer(task, rng))
    return out

  return generate


# ---------------------------------------------------------------------------
# OpenAI-compatible endpoint
# ---------------------------------------------------------------------------


def chat_completions_url(base_url: str) -> str:
  """'http://host:8000' or '.../v1' -> '.../v1/chat/completions'."""
  if not base_url.startswith(("http://", "https://")):
    raise ValueError(f"endpoint URL must start with http:// or https://, got {base_url!r}")
  url = base_url.rstrip("/")
  if url.endswith("/chat/completions"):
    return url
  return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def chat_completion(base_url: str, model: str, messages: list[dict[str, str]], *,
                    api_key: str | None = None, temperature: float = 1.0,
                    max_tokens: int = 256, timeout: float = 60.0, retries: int = 2) -> str:
  """One `POST /v1/chat/completions` (timeout and retries: `openai_http.post_json`);
  returns choices[0].message.content."""
  url = chat_completions_url(base_url)
  reply = post_json(url, {"model": model, "messages": messages, "temperature": temperature,
                          "max_tokens": max_tokens},
                    api_key=api_key, timeout_s=timeout, retries=retries)
  try:
    content = reply["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise ValueError(f"{url}: response has no choices[0].message.content: "
                     f"{str(reply)[:200]}") from None
  if not isinstance(content, str):
    raise ValueError(f"{url}: choices[0].message.content is {type(content).__name__}, not str")
  return content


def openai_generate_fn(base_url: str, model: str, *, api_key: str | None = None,
                       system: str = THINK_OFF_SYSTEM, temperature: float = 1.0,
                       max_tokens: int = 256, timeout: float = 60.0) -> GenerateFn:
  """A GenerateFn asking an OpenAI-compatible server for think-off answers, one request each."""

  def generate(prompts: list[str]) -> list[str]:
    replies = []
    with Progress(f"{model} requests", len(prompts), unit="requests") as progress:
      for prompt in prompts:
        replies.append(chat_completion(base_url, model,
                                       [{"role": "system", "content": system},
                                        {"role": "user", "content": prompt}],
                                       api_key=api_key, temperature=temperature,
                                       max_tokens=max_tokens, timeout=timeout))
        progress.update()
    return replies

  return generate
