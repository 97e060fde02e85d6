"""Tree rollouts without a turn barrier (tiny model): the same episodes and trajectory-manager
records as the turn-by-turn reference driver whatever order environment steps end in, and an
episode's turns do not wait for another episode's environment step."""

import os
import sys
import threading
import time

import jax
import numpy as np
import pytest

from kat_jax.agentic import rollout as rollout_module
from kat_jax.agentic.environments import Environment, StepResult
from kat_jax.agentic.rollout import RolloutConfig, tree_rollout
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import get_preset, init_params
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.sampling import EngineSampler, Sampler, SamplingParams, prepare_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from turn_by_turn_rollout import run_turns_with_barrier  # pylint: disable=g-import-not-at-top,wrong-import-position

_TOOLS = [{"type": "function", "function": {"name": "look", "description": "look",
                                             "parameters": {"type": "object"}}}]
_CUT_OFF_REWARD = 0.5
MAX_LENGTH = 800  # task 2 (the longest prompt) has no room for a third turn


def _score(text: str) -> int:
  return sum(map(ord, text))


class UnevenEnv(Environment):
  """Episodes that end at a turn their answers decide, observations of answer-dependent
  length, and a prompt that grows with the task (task 2 meets max_length). Each step sleeps
  DELAYS[(answer score + copy + salt) % 3] seconds (copy: which object of the episode's
  environment, so branches that drew the same answer differ too), so steps end in an order
  that `salt` changes."""

  tools = _TOOLS
  DELAYS = (0.0, 0.02, 0.05)
  salt = 0

  def reset(self, task):
    self.turns, self.done = 0, False
    return [{"role": "user", "content": f"task {task} " + "p" * (90 * task)}]

  def step(self, action):
    self.turns += 1
    score = _score(action.content)
    time.sleep(self.DELAYS[(score + id(self) // 64 + self.salt) % len(self.DELAYS)])
    if self.turns >= 2 and score % 3 == 0:
      self.done = True
      return StepResult([], True, float(score % 5))
    return StepResult([{"role": "tool", "content": "o" * (score % 7)}], False)

  def finish(self):
    self.done = True
    return _CUT_OFF_REWARD

  def final_reward(self, answer):
    return 0.0


@pytest.fixture(scope="module")
def model():
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1, initializer_range=0.3)
  dparams = prepare_params(init_params(config, jax.random.key(0)), config)
  return tokenizer, config, dparams


def _rollout(model, salt: int, monkeypatch, barrier: bool, vocab_limit: int):
  with monkeypatch.context() as patch:
    if barrier:
      patch.setattr(rollout_module, "_run_turns", run_turns_with_barrier)
    patch.setattr(UnevenEnv, "salt", salt)
    return _uneven_rollout(*model, vocab_limit)


def _uneven_rollout(tokenizer, config, dparams, vocab_limit: int = 128):
  # Three slots for up to 12 live episodes: turns queue for slots as well as for env steps.
  sampler = EngineSampler(config, pad_id=tokenizer.pad_id, prefill_chunk=32, num_slots=3,
                          page_size=4)
  cfg = RolloutConfig(branching=(2, 2), max_turns=3, max_new_tokens=4, max_length=MAX_LENGTH,
                      sampling=SamplingParams(1.0, vocab_limit=vocab_limit))
  manager = TrajectoryManager()
  groups = tree_rollout(sampler, dparams, UnevenEnv, [0, 1, 2], tokenizer, jax.random.key(7),
                        cfg, manager=manager)
  records = [manager.trajectories(g[0].record_group) for g in groups]
  return groups, records


# vocab_limit 128: the draw covers every way an episode ends. 2: branches often draw the same
# turn, so the manager continues one recorded turn with several episodes' next turns (children
# of one interaction), whose record order must not follow the order they end in.
@pytest.mark.parametrize("vocab_limit", [128, 2])
def test_rollout_equals_the_turn_by_turn_reference_whatever_order_env_steps_end_in(
    model, monkeypatch, vocab_limit):
  reference = _rollout(model, 0, monkeypatch, barrier=True, vocab_limit=vocab_limit)
  runs = [_rollout(model, salt, monkeypatch, barrier=False, vocab_limit=vocab_limit)
          for salt in (0, 1)]
  ref_groups, ref_records = reference
  episodes = [e for g in ref_groups for e in g]
  if vocab_limit == 128:
    # Ended by the environment (before the turn limit too), by max_length (task 2: a cut-off
    # before turn 3) and by the turn limit (turn 3).
    ended_by_env = [e for e in episodes if e.reward != _CUT_OFF_REWARD]
    assert any(e.turns == 2 and e.group < 2 for e in ended_by_env)
    cut = [e for e in episodes if e.reward == _CUT_OFF_REWARD]
    assert {e.turns for e in cut if e.group == 2} == {2} and {e.turns for e in cut} == {2, 3}
  else:  # two first-turn branches drew the same turn and then went different ways
    assert any(a.branch_id[0] != b.branch_id[0] and a.tokens != b.tokens
               and a.loss_mask.index(1) + 4 <= len(a.tokens) and
               a.tokens[:a.loss_mask.index(1) + 4] == b.tokens[:b.loss_mask.index(1) + 4]
               for g in ref_groups for a in g for b in g)
  for groups, records in runs:
    assert [len(g) for g in groups] == [len(g) for g in ref_groups]
    for a, b in zip(episodes, [e for g in groups for e in g]):
      assert (a.group, a.branch_id, a.turns, a.reward) == (b.group, b.branch_id, b.turns,
                                                           b.reward)
      assert a.tokens == b.tokens and a.loss_mask == b.loss_mask and a.messages == b.messages
      np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(a.entropies, b.entropies, rtol=1e-5, atol=1e-6)
    # The manager's trajectories: one per episode, in branch order, equal to the reference's.
    for ref_group, group, episodes_of_group in zip(ref_records, records, groups):
      assert len(group) == len(ref_group) == len(episodes_of_group)
      for a, b, e in zip(ref_group, group, episodes_of_group):
        np.testing.assert_array_equal(b.tokens, e.tokens)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
        np.testing.assert_array_equal(a.versions, b.versions)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
        assert a.reward == b.reward == e.reward
        assert len(a.interactions) == len(b.interactions) == e.turns


def test_an_episode_takes_its_next_turn_while_another_waits_on_its_environment_step():
  released = threading.Event()
  waited = []

  class WaitingEnv(Environment):
    """Task 0's first step returns only after task 1's episode took both its turns."""

    tools = _TOOLS

    def reset(self, task):
      self.task, self.turns, self.done = task, 0, False
      return [{"role": "user", "content": f"task {task}"}]

    def step(self, action):
      self.turns += 1
      if self.task == 0 and self.turns == 1:
        waited.append(released.wait(timeout=30))  # a turn barrier would time out here
      if self.turns == 2:
        if self.task == 1:
          released.set()
        self.done = True
        return StepResult([], True, float(self.task))
      return StepResult([{"role": "tool", "content": "output"}], False)

    def final_reward(self, answer):
      return 0.0

  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1)
  cfg = RolloutConfig(branching=(1,), max_turns=2, max_new_tokens=3, max_length=1024,
                      sampling=SamplingParams(1.0, vocab_limit=128))
  stats = {}
  groups = tree_rollout(Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=256),
                        prepare_params(init_params(config, jax.random.key(0)), config),
                        WaitingEnv, [0, 1], tokenizer, jax.random.key(2), cfg, stats=stats)
  assert waited == [True]
  assert [[(e.turns, e.reward) for e in g] for g in groups] == [[(2, 0.0)], [(2, 1.0)]]
  assert stats["env_wait_s"] > 0  # the engine idled while task 0's step waited
