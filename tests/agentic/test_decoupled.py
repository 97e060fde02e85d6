"""Rollouts outside the trainer's process: weight snapshots and the OpenAI-compatible server path."""

import jax
import numpy as np
import pytest

from kat_jax.agentic.batches import take_groups
from kat_jax.agentic.decoupled import OpenAICompletionsClient, WeightStore, server_rollout
from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.rollout import RolloutConfig
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.testing import LocalJsonServer


def test_weight_store_round_trip_and_keep(tmp_path):
  store = WeightStore(str(tmp_path), keep=2)
  like = {"a": np.zeros(3, np.float32), "b": {"c": np.zeros((2, 2), np.float32)}}
  assert store.latest(like) is None
  for step in range(4):
    store.publish(step, jax.tree.map(lambda x: x + step, like))
  assert store.steps() == [2, 3]
  step, params = store.latest(like)
  assert step == 3 and np.all(params["b"]["c"] == 3)


_SAMPLES = ["ok", "12", "3x"]  # sample i of a request writes _SAMPLES[i] then <|im_end|>


def _sample_ids(i: int) -> list[int]:
  return [ord(c) for c in _SAMPLES[i]] + [258]


def _sample_logprobs(i: int) -> list[float]:
  return [-0.5 * (i + 1), -0.25 * (i + 1), -0.125 * (i + 1)]


def _completions(path, body):
  """Answers /v1/completions like vLLM, with a different answer for every sample index."""
  del path
  return 200, {"choices": [
      {"index": i, "finish_reason": "stop", "text": _SAMPLES[i],
       "logprobs": {"tokens": [f"token_id:{t}" for t in _sample_ids(i)],
                    "token_logprobs": _sample_logprobs(i)}}
      for i in range(body["n"])]}


def test_server_rollout_through_an_openai_compatible_endpoint():
  manager = TrajectoryManager()
  with LocalJsonServer(_completions) as server:
    tokenizer = get_tokenizer("bytes")
    client = OpenAICompletionsClient(server.url, "m")
    cfg = RolloutConfig(branching=(3, 2), max_turns=2, max_new_tokens=8)
    groups = server_rollout(client, lambda: DigitsEnv(rounds=2, width=2), [0], tokenizer, cfg,
                            manager=manager)
  requests = [r["body"] for r in server.requests]
  # one request at turn 0 (n=3), then one per branch at turn 1 (n=2)
  assert [r["n"] for r in requests] == [3, 2, 2, 2]
  assert [e.branch_id for e in groups[0]] == [(a, b) for a in range(3) for b in range(2)]
  digits = [sum(c.isdigit() for c in text[:2]) / 2 for text in _SAMPLES]
  for e in groups[0]:  # every branch holds its own samples, not copy 0's
    first, second = e.branch_id
    answers = [m["content"] for m in e.messages if m["role"] == "assistant"]
    assert answers == [_SAMPLES[first], _SAMPLES[second]]
    assert e.turns == 2 and e.reward == pytest.approx((digits[first] + digits[second]) / 2)
    mask = np.array(e.loss_mask, bool)
    assert np.array(e.tokens)[mask].tolist() == _sample_ids(first) + _sample_ids(second)
    assert np.array(e.logprobs)[mask].tolist() == (_sample_logprobs(first)
                                                   + _sample_logprobs(second))
    # the turn-1 request of this branch was sent its own first turn
    request = requests[1 + first]
    assert request["prompt"] == e.tokens[:len(request["prompt"])]
  assert requests[0]["prompt"] == groups[0][0].tokens[
      :len(requests[0]["prompt"])]
  recorded = take_groups(manager, groups)[0]  # the manager rebuilds the same trajectories
  for e, t in zip(groups[0], recorded, strict=True):
    assert t.tokens.tolist() == e.tokens and t.loss_mask.tolist() == e.loss_mask
    assert t.logprobs.tolist() == np.float32(e.logprobs).tolist() and t.reward == e.reward
  assert manager.num_interactions == 0
  assert requests[0]["return_tokens_as_token_ids"] is True
  with pytest.raises(ValueError, match="token_id"):
    from kat_jax.agentic.decoupled import _token_id
    _token_id("ok")
