"""Rollouts outside the trainer's process: weight snapshots and the OpenAI-compatible server
path."""

import threading
import time

import jax
import numpy as np
import pytest

from kat_jax.agentic.batches import take_groups
from kat_jax.agentic.decoupled import OpenAICompletionsClient, WeightStore, server_rollout
from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.rollout import RolloutConfig
from kat_jax.data.chat_template import tokenize_chat
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
  # one request at turn 0 (n=3), then one per branch at turn 1 (n=2), sent concurrently
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
    # the turn-1 request of this branch (they arrive in any order) was sent its own first turn
    own = [r for r in requests[1:] if r["prompt"] == e.tokens[:len(r["prompt"])]]
    assert len(own) == 1 and _SAMPLES[first] in tokenizer.decode(own[0]["prompt"])
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


class _PromptClient:
  """A fake `OpenAICompletionsClient`: sample i of a prompt holding k '7' characters answers
  f"{k}x" (i = 0) or f"{k}7" (i = 1) then <|im_end|>, so a branch's answers follow from its
  own earlier answers (log-probs too follow from the prompt). `delay(prompt)` seconds of
  sleep per call; `hold(prompt)` runs inside the call (a test hook); the most calls in flight
  at once is kept in `max_in_flight`."""

  def __init__(self, stop: int, delay=lambda prompt: 0.0, hold=lambda prompt: None):
    self.stop, self.delay, self.hold = stop, delay, hold
    self.lock = threading.Lock()
    self.in_flight = self.max_in_flight = 0
    self.prompts: list[list[int]] = []

  def complete(self, prompt, *, n, max_tokens, temperature, stop_ids):
    del max_tokens, temperature
    assert tuple(stop_ids) == (self.stop,)
    prompt = list(prompt)
    with self.lock:
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      self.prompts.append(prompt)
    try:
      self.hold(prompt)
      time.sleep(self.delay(prompt))
    finally:
      with self.lock:
        self.in_flight -= 1
    sevens = prompt.count(ord("7"))
    samples = [[ord(c) for c in f"{sevens}{'7' if i else 'x'}"] + [self.stop] for i in range(n)]
    # A token's log-prob follows from its context (one context, one sample: one log-prob).
    return [(ids, [-0.05 * ((t + j) % 9 + 1) - 0.125 * sevens for j, t in enumerate(ids)], True)
            for ids in samples]


def _digits_rollout(client, tasks, cfg, **kwargs):
  manager = TrajectoryManager()
  groups = server_rollout(client, lambda: DigitsEnv(rounds=2, width=2), tasks,
                          get_tokenizer("bytes"), cfg, manager=manager, **kwargs)
  return groups, manager


def _ranks(interactions, records) -> list[int]:
  """A trajectory's interaction ids as ranks among its group's ids (record order)."""
  ids = sorted({i for t in records for i in t.interactions})
  return [ids.index(i) for i in interactions]


def test_server_rollout_episodes_and_manager_records_do_not_depend_on_reply_order():
  stop = get_tokenizer("bytes").im_end_id
  cfg = RolloutConfig(branching=(2, 2), max_turns=3, max_new_tokens=4)
  # Replies come back in two opposite orders (sleeps keyed on the prompt) and one at a time.
  clients = [_PromptClient(stop, lambda p: 0.002 * (sum(p) % 5)),
             _PromptClient(stop, lambda p: 0.002 * (4 - sum(p) % 5)), _PromptClient(stop)]
  runs = [_digits_rollout(clients[0], [0, 1, 2], cfg),
          _digits_rollout(clients[1], [0, 1, 2], cfg),
          _digits_rollout(clients[2], [0, 1, 2], cfg, max_concurrency=1)]
  assert clients[2].max_in_flight == 1 and clients[0].max_in_flight > 1
  assert sorted(clients[0].prompts) == sorted(clients[1].prompts) == sorted(clients[2].prompts)
  ref_groups, ref_manager = runs[0]
  assert [len(g) for g in ref_groups] == [4, 4, 4]
  for groups, manager in runs[1:]:
    for ref_group, group in zip(ref_groups, groups, strict=True):
      assert len(ref_group) == len(group)
      for a, b in zip(ref_group, group):
        assert (a.group, a.branch_id, a.turns, a.reward) == (
            b.group, b.branch_id, b.turns, b.reward)
        assert (a.tokens, a.loss_mask, a.logprobs, a.messages) == (
            b.tokens, b.loss_mask, b.logprobs, b.messages)
    # Each group's tree: the same trajectories, made of the same turns recorded in the same
    # order (ids are numbered across groups, whose records interleave by timing).
    for ref_group, group in zip(ref_groups, groups):
      ref_records = ref_manager.trajectories(ref_group[0].record_group)
      records = manager.trajectories(group[0].record_group)
      assert [_ranks(t.interactions, ref_records) for t in ref_records] == [
          _ranks(t.interactions, records) for t in records]
      for a, b, e in zip(ref_records, records, group, strict=True):
        assert a.reward == b.reward == e.reward and b.tokens.tolist() == e.tokens
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_server_rollout_equals_the_hand_worked_two_turn_tree():
  tokenizer = get_tokenizer("bytes")
  client = _PromptClient(tokenizer.im_end_id)
  cfg = RolloutConfig(branching=(2, 2), max_turns=2, max_new_tokens=4)
  groups, manager = _digits_rollout(client, [0], cfg)
  # Turn 0 (no '7' in the prompt): "0x", "07". Turn 1: branch 0 again sees no '7' ("0x",
  # "07"), branch 1 sees one ("1x", "17"). Reward: mean over turns of digits in 2 characters.
  answers = {(0, 0): ["0x", "0x"], (0, 1): ["0x", "07"], (1, 0): ["07", "1x"],
             (1, 1): ["07", "17"]}
  rewards = {(0, 0): 0.5, (0, 1): 0.75, (1, 0): 0.75, (1, 1): 1.0}
  assert [e.branch_id for e in groups[0]] == list(answers)
  assert len(client.prompts) == 3  # one request per live episode per turn
  prompt = tokenize_chat(tokenizer, [{"role": "user", "content": "Reply with digits only. (0)"}],
                         template="qwen2.5", add_generation_prompt=True).ids
  again = tokenizer.encode("\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n")
  for e in groups[0]:
    first, second = (tokenizer.encode(a) + [tokenizer.im_end_id] for a in answers[e.branch_id])
    assert [m["content"] for m in e.messages if m["role"] == "assistant"] == answers[e.branch_id]
    assert e.tokens == prompt + first + again + second
    assert e.loss_mask == [0] * len(prompt) + [1] * 3 + [0] * len(again) + [1] * 3
    assert e.reward == rewards[e.branch_id] and e.turns == 2
  recorded = manager.trajectories(groups[0][0].record_group)
  assert [t.tokens.tolist() for t in recorded] == [e.tokens for e in groups[0]]
  assert [t.reward for t in recorded] == [rewards[b] for b in answers]


def test_server_rollout_cuts_an_episode_that_max_length_leaves_no_room_for_a_turn():
  tokenizer = get_tokenizer("bytes")
  client = _PromptClient(tokenizer.im_end_id)
  prompt = tokenize_chat(tokenizer, [{"role": "user", "content": "Reply with digits only. (0)"}],
                         template="qwen2.5", add_generation_prompt=True).ids
  # Room for the first turn's 3 tokens and 4 more, not for the observation + a second turn.
  cfg = RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=4,
                      max_length=len(prompt) + 3 + 4 + 4)
  groups, manager = _digits_rollout(client, [0], cfg)
  assert len(client.prompts) == 1
  assert [(e.branch_id, e.turns, e.reward) for e in groups[0]] == [((0,), 1, 0.0),
                                                                    ((1,), 1, 0.0)]
  for e, answer in zip(groups[0], ["0x", "07"]):  # cut off: no observation appended
    assert e.tokens == prompt + tokenizer.encode(answer) + [tokenizer.im_end_id]
    assert e.messages[-1] == {"role": "assistant", "content": answer}
  assert [t.reward for t in manager.trajectories(groups[0][0].record_group)] == [0.0, 0.0]
  with pytest.raises(ValueError, match="max_length"):
    _digits_rollout(client, [0], RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=4,
                                               max_length=len(prompt) + 3))


def test_server_rollout_sends_an_episodes_next_turn_while_another_episodes_turn_is_in_flight():
  stop = get_tokenizer("bytes").im_end_id
  task0_turn1_sent = threading.Event()
  waited = []

  def hold(prompt):
    text = bytes(t for t in prompt if t < 256).decode()
    turn = prompt.count(stop) // 2 - 1  # system + user, then 2 more per turn
    if "(0)" in text and turn == 1:
      task0_turn1_sent.set()
    if "(1)" in text and turn == 0:  # task 1's first reply waits for task 0's second turn
      waited.append(task0_turn1_sent.wait(timeout=30))

  client = _PromptClient(stop, hold=hold)
  cfg = RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=4)
  groups, _ = _digits_rollout(client, [0, 1], cfg, max_concurrency=4)
  assert waited == [True] and client.max_in_flight >= 2
  assert [len(g) for g in groups] == [2, 2] and all(e.turns == 2 for g in groups for e in g)


def test_server_rollout_raises_the_error_of_a_failed_request():
  stop = get_tokenizer("bytes").im_end_id

  def hold(prompt):
    if prompt.count(stop) > 2:  # every second-turn request fails
      raise ConnectionError("server went away")

  with pytest.raises(ConnectionError, match="server went away"):
    _digits_rollout(_PromptClient(stop, hold=hold), [0, 1],
                    RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=4))
