"""Majority-vote mode tagging, random assignment, and the OpenAI-compatible client against a
local fake server."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from kat_jax.autothink import tagging
from kat_jax.tasks import dual_regime as tasks
from kat_jax.testing import LocalJsonServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_openai import FakeServer  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_vote_rule_strict_majority_correct_means_think_off():
  assert tagging.vote_mode(3, 5) == "think_off"
  assert tagging.vote_mode(2, 5) == "think_on"
  assert tagging.vote_mode(2, 4) == "think_on"  # a tie is no majority
  assert tagging.vote_mode(5, 5) == "think_off" and tagging.vote_mode(0, 1) == "think_on"
  with pytest.raises(ValueError):
    tagging.vote_mode(6, 5)


def _fake_generate(ts, correct_per_task):
  """Sample s of task i is correct iff s < correct_per_task[i]."""
  calls = {"n": 0}

  def generate(prompts):
    s = calls["n"]
    calls["n"] += 1
    return [f"<answer>\n{t.answer}\n</answer>" if s < k else "no idea"
            for t, k in zip(ts, correct_per_task)]

  return generate, calls


def test_tag_tasks_majority_vote_with_fake_generate_fn():
  ts = tasks.generate_tasks(6, seed=2)
  counts = [0, 1, 2, 3, 4, 5]
  generate, calls = _fake_generate(ts, counts)
  tagged = tagging.tag_tasks(ts, generate, num_samples=5, random_fraction=0.0)
  assert calls["n"] == 5
  assert [r["votes_correct"] for r in tagged] == counts
  assert [r["mode"] for r in tagged] == ["think_on"] * 3 + ["think_off"] * 3
  assert all(r["mode_source"] == "vote" for r in tagged)
  assert [r["difficulty_label"] for r in tagged] == ["hard"] * 3 + ["medium", "easy", "easy"]
  assert tagged[0]["prompt"] == ts[0].prompt and tagged[0]["verifier"] == ts[0].verifier


def test_random_assignment_fraction_is_exact_and_overrides_the_vote():
  ts = tasks.generate_tasks(100, seed=4)  # small: every sample is verified
  # One sample, always right: the vote says think_off everywhere (more votes only cost time).
  generate, _ = _fake_generate(ts, [1] * len(ts))
  tagged = tagging.tag_tasks(ts, generate, num_samples=1, random_fraction=0.1, seed=1)
  randoms = [r for r in tagged if r["mode_source"] == "random"]
  assert len(randoms) == 10
  assert {r["mode"] for r in randoms} == {"think_on", "think_off"}
  assert all(r["mode"] == "think_off" for r in tagged if r["mode_source"] == "vote")
  again = tagging.tag_tasks(ts, _fake_generate(ts, [1] * len(ts))[0], num_samples=1,
                            random_fraction=0.1, seed=1)
  assert [r["mode"] for r in again] == [r["mode"] for r in tagged]


def test_tag_tasks_rejects_wrong_response_count():
  ts = tasks.generate_tasks(3, seed=0)
  with pytest.raises(ValueError, match="2 responses for 3 prompts"):
    tagging.tag_tasks(ts, lambda p: ["x", "y"], num_samples=1)


def test_simulated_solver_separates_easy_from_hard():
  ts = tasks.generate_tasks(60, seed=9)  # 33 hard, 27 easy; every code vote runs a sandbox
  tagged = tagging.tag_tasks(ts, tagging.simulated_solver(ts, seed=0), num_samples=5,
                             random_fraction=0.0)
  on = np.asarray([r["mode"] == "think_on" for r in tagged])
  hard = np.asarray([t.regime == "hard" for t in ts])
  assert on[hard].mean() > 0.85 and on[~hard].mean() < 0.1


def test_extract_answer_and_infer_domain():
  assert tagging.extract_answer("<think_off>\n<answer>\n42\n</answer>") == "42"
  assert tagging.extract_answer("  42 ") == "42"
  # Reasoning models put their reasoning first; only what follows </think> is the answer.
  assert tagging.extract_answer("<think>\n40 + 2 = 42? no, 41\n</think>\n\n42") == "42"
  assert tagging.extract_answer(" <think>r</think><answer>\n7\n</answer>") == "7"
  assert tagging.extract_answer("<think>never closed, 42") == ""  # cut off: no answer
  assert tagging.infer_domain("Write a Python function f(n)") == "code"
  assert tagging.infer_domain("Solve for x: 2*x = 4") == "math"
  assert tagging.infer_domain("What force acts on the mass?") == "science"
  assert tagging.infer_domain("Who wrote Hamlet?") == "general"


def test_tag_tasks_prints_progress_over_all_votes(capsys):
  ts = [t for t in tasks.generate_tasks(40, seed=5) if t.verifier["type"] == "choice"][:3]
  assert len(ts) == 3
  tagging.tag_tasks(ts, tagging.simulated_solver(ts), num_samples=2, random_fraction=0.0)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "tagging: think-off answers scored: 0/6 answers"
  assert lines[-1].startswith("tagging: think-off answers scored: 6/6 answers in ")


# ---------------------------------------------------------------------------
# OpenAI-compatible client against a local fake
# ---------------------------------------------------------------------------


def test_chat_completions_url():
  assert tagging.chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
  assert tagging.chat_completions_url("http://h/v1/") == "http://h/v1/chat/completions"
  with pytest.raises(ValueError, match="http"):
    tagging.chat_completions_url("h:8000")


def test_endpoint_generate_fn_drives_the_vote():
  ts = tasks.generate_tasks(8, seed=11)
  answers = {t.prompt: t.answer for t in ts if t.regime == "easy"}
  with FakeServer(answers) as server:
    generate = tagging.openai_generate_fn(server.url, "fake-model", api_key="k123",
                                          temperature=0.7, max_tokens=32)
    tagged = tagging.tag_tasks(ts, generate, num_samples=2, random_fraction=0.0)
  assert len(server.requests) == 16
  request = server.requests[0]
  assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k123"
  assert request["body"]["model"] == "fake-model" and request["body"]["max_tokens"] == 32
  assert request["body"]["messages"][0] == {"role": "system",
                                            "content": tagging.THINK_OFF_SYSTEM}
  assert [r["mode"] for r in tagged] == [
      "think_off" if t.regime == "easy" else "think_on" for t in ts]


def test_endpoint_reasoning_replies_are_scored_on_the_answer():
  ts = [t for t in tasks.generate_tasks(12, seed=3) if t.verifier["type"] == "math"][:2]
  assert len(ts) == 2
  # The reasoning mentions a wrong value last; the text after </think> is right (task 0) or
  # wrong (task 1), so only extracting after </think> gives the right votes.
  answers = {ts[0].prompt: f"<think>maybe {int(ts[0].answer.split()[-1]) + 1}</think>"
                           f"{ts[0].answer}",
             ts[1].prompt: f"<think>{ts[1].answer}</think>I do not know"}
  with FakeServer(answers) as server:
    generate = tagging.openai_generate_fn(server.url, "reasoner")
    tagged = tagging.tag_tasks(ts, generate, num_samples=1, random_fraction=0.0)
  assert [r["votes_correct"] for r in tagged] == [1, 0]


def test_endpoint_errors_are_clear():
  with FakeServer({}, status=500, raw_body=b'{"error": "boom"}') as server:
    with pytest.raises(RuntimeError, match="HTTP 500.*boom"):
      tagging.chat_completion(server.url, "m", [{"role": "user", "content": "hi"}], retries=0)
  with FakeServer({}, raw_body=b'{"unexpected": 1}') as server:
    with pytest.raises(ValueError, match=r"choices\[0\].message.content"):
      tagging.chat_completion(server.url, "m", [{"role": "user", "content": "hi"}])
  with pytest.raises(RuntimeError, match="cannot connect"):
    tagging.chat_completion("http://127.0.0.1:9", "m", [{"role": "user", "content": "hi"}],
                            timeout=2, retries=0)


def test_endpoint_busy_server_is_retried_until_it_answers():
  replies = [(503, b"busy"), (429, b"slow down"),
             (200, {"choices": [{"message": {"content": "42"}}]})]
  with LocalJsonServer(lambda path, body: replies[len(server.requests) - 1]) as server:
    answer = tagging.chat_completion(server.url, "m", [{"role": "user", "content": "q"}],
                                     retries=2)
  assert answer == "42" and len(server.requests) == 3


def test_endpoint_client_error_fails_without_retrying():
  with FakeServer({}, status=401, raw_body=b'{"error": "bad key"}') as server:
    with pytest.raises(RuntimeError, match="HTTP 401.*bad key"):
      tagging.chat_completion(server.url, "m", [{"role": "user", "content": "q"}], retries=3)
  assert len(server.requests) == 1


def test_endpoint_that_never_replies_times_out():
  def slow(path, body):
    time.sleep(1.0)
    return 200, {"choices": [{"message": {"content": "late"}}]}
  with LocalJsonServer(slow) as server:
    with pytest.raises(RuntimeError, match=r"no reply within 0.2s"):
      tagging.chat_completion(server.url, "m", [{"role": "user", "content": "q"}],
                              timeout=0.2, retries=0)
