"""Tree rollouts with the tiny model: shared prefixes, masks, rendered text, behaviour log-probs."""

import jax
import numpy as np
import pytest

from kat_jax.agentic.environments import Environment, StepResult
from kat_jax.agentic.rollout import RolloutConfig, continuation_text, tree_rollout
from kat_jax.rl.tree import build_trees, unrolled_batch
from kat_jax.data.chat_template import render_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import make_logprob_fn
from kat_jax.sampling import Sampler, SamplingParams, prepare_params


class ScriptedToolEnv(Environment):
  """Answers every turn with a tool output; ends after `max_turns` turns."""

  tools = [{"type": "function", "function": {"name": "look", "description": "look",
                                              "parameters": {"type": "object"}}}]

  def __init__(self):
    super().__init__()
    self.max_turns = 3

  def reset(self, task):
    self.turns, self.done = 0, False
    return [{"role": "user", "content": f"task {task}"}]

  def step(self, action):
    self.turns += 1
    if self.turns >= self.max_turns:
      self.done = True
      return StepResult([], True, float(len(action.content) % 2))
    return StepResult([{"role": "tool", "content": f"output {self.turns}"}], False)

  def final_reward(self, answer):
    return 0.0


@pytest.fixture(scope="module")
def rollout():
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1, initializer_range=0.3)
  params = init_params(config, jax.random.key(0))
  sampler = Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=256)
  # vocab_limit 128: ASCII only, so every turn is cut at max_new_tokens (forced <|im_end|>)
  # except with the stop id allowed below.
  cfg = RolloutConfig(branching=(2, 1, 2), max_turns=3, max_new_tokens=6, max_length=1024,
                      sampling=SamplingParams(1.0, vocab_limit=128))
  groups = tree_rollout(sampler, prepare_params(params, config), ScriptedToolEnv, [0, 1],
                        tokenizer, jax.random.key(1), cfg)
  return tokenizer, config, params, groups


def test_groups_branch_and_share_prefixes(rollout):
  tokenizer, _, _, groups = rollout
  assert [len(g) for g in groups] == [4, 4]
  for group in groups:
    a, b = group[0], group[1]  # same first-turn copy, split before turn 3
    assert a.branch_id[:2] == b.branch_id[:2] and a.branch_id[2] != b.branch_id[2]
    split = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
    assert split > len(a.tokens) // 2  # two full turns are shared
    assert a.logprobs[:split] == b.logprobs[:split]
    assert a.entropies[:split] == b.entropies[:split]
    trees = build_trees([[e.trajectory(1.0) for e in group]], ObjectiveConfig())
    assert trees[0].num_nodes < trees[0].unrolled_tokens


def test_tokens_equal_the_rendered_chat_and_masks_cover_only_generation(rollout):
  tokenizer, _, _, groups = rollout
  for group in groups:
    for e in group:
      assert e.done and e.turns == 3
      assert tokenizer.decode(e.tokens) + "\n" == render_chat(e.messages, tools=e.tools,
                                                              template="qwen2.5")
      mask = np.array(e.loss_mask, bool)
      assert mask.sum() == 3 * 6  # three turns of max_new_tokens generated tokens
      generated = tokenizer.decode(np.array(e.tokens)[mask])
      assert generated == "".join(m["content"] for m in e.messages if m["role"] == "assistant")
      assert "output 1" not in generated and "output 1" in tokenizer.decode(e.tokens)
      assert np.all(np.array(e.entropies)[~mask] == 0) and np.all(np.array(e.logprobs)[mask] < 0)


def test_behaviour_logprobs_equal_the_training_forward(rollout):
  tokenizer, config, params, groups = rollout
  flat = [e.trajectory(1.0) for g in groups for e in g]
  batch = unrolled_batch([flat], ObjectiveConfig(), seq_len=768, pad_id=tokenizer.pad_id)
  logp = np.asarray(jax.jit(make_logprob_fn(config, loss_chunk=256))(params, batch))
  for r, t in enumerate(flat):
    mask = t.loss_mask > 0
    np.testing.assert_allclose(logp[r, :len(t.tokens)][mask], t.old_logp[mask], atol=2e-4)


def test_continuation_text_is_cut_from_the_template():
  text = continuation_text([{"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}])
  assert text == ("\n<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb"
                  "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="branching"):
    RolloutConfig(branching=(0,))


def test_greedy_tree_rollout_is_independent_of_slots_and_page_size_and_frees_every_page(
    monkeypatch):
  import kat_jax.agentic.rollout as rollout_module  # pylint: disable=g-import-not-at-top
  from kat_jax.sampling import EngineSampler  # pylint: disable=g-import-not-at-top
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1, initializer_range=0.3)
  dparams = prepare_params(init_params(config, jax.random.key(0)), config)
  cfg = RolloutConfig(branching=(2, 1, 2), max_turns=3, max_new_tokens=5, max_length=1024,
                      sampling=SamplingParams(0.0, vocab_limit=128))
  engines = []
  build = rollout_module._engine  # pylint: disable=protected-access
  monkeypatch.setattr(rollout_module, "_engine", lambda *a: engines.append(build(*a)) or
                      engines[-1])
  runs = [tree_rollout(sampler, dparams, ScriptedToolEnv, [0, 1], tokenizer, jax.random.key(1),
                       cfg)
          for sampler in (Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=256),
                          EngineSampler(config, pad_id=tokenizer.pad_id, prefill_chunk=32,
                                        num_slots=3, page_size=4))]
  assert [e.num_slots for e in engines] == [8, 3]
  assert all(e.allocator.num_used == 0 for e in engines)  # every kept sequence released
  flat = [[e for g in groups for e in g] for groups in runs]
  assert len(flat[0]) == len(flat[1]) == 8
  for a, b in zip(*flat):
    assert a.branch_id == b.branch_id and a.tokens == b.tokens and a.loss_mask == b.loss_mask
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)


def test_weights_pushed_while_a_tree_rollout_runs_reach_its_engine_until_it_ends():
  from kat_jax.rl.pipeline import RolloutWeights  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.trajectories import TrajectoryManager  # pylint: disable=g-import-not-at-top
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1)
  old, new = (prepare_params(init_params(config, jax.random.key(s)), config) for s in (0, 1))
  weights = RolloutWeights(lambda p: p)
  weights.push(old, 3)
  engines = []
  real_attach = weights.attach
  weights.attach = lambda engine: (engines.append(engine), real_attach(engine))

  class PushingEnv(ScriptedToolEnv):
    """Pushes version 4 (other weights) during the first environment step: an update lands
    between turn 1 and turn 2, while every episode is in flight."""

    def step(self, action):
      if weights.current()[1] == 3:
        weights.push(new, 4)
      return super().step(action)

  cfg = RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=3, max_length=1024,
                      sampling=SamplingParams(1.0, vocab_limit=128))
  manager = TrajectoryManager()
  groups = tree_rollout(Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=256), weights,
                        PushingEnv, [0], tokenizer, jax.random.key(2), cfg, manager=manager)
  assert len(engines) == 1 and engines[0].version == 4 and engines[0].params is new
  # Each token keeps the version it was sampled with: turn 1 under 3, turn 2 under 4.
  for trajectory in manager.trajectories(groups[0][0].record_group):
    np.testing.assert_array_equal(trajectory.versions[trajectory.loss_mask > 0], [3] * 3 + [4] * 3)
  weights.push(old, 5)  # after the rollout: its engine is detached and keeps version 4
  assert engines[0].version == 4
  weights.detach(engines[0])  # detaching an absent sampler is a no-op


def test_a_cut_off_episode_is_scored_by_its_environment_step_on_the_pool():
  import threading  # pylint: disable=g-import-not-at-top
  finishes = []

  class OpenEndedEnv(ScriptedToolEnv):
    """Never ends by itself: the rollout's turn limit cuts every episode off."""

    def __init__(self):
      super().__init__()
      self.max_turns = 100

    def finish(self):
      finishes.append(threading.current_thread() is threading.main_thread())
      self.done = True
      return 0.25

  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1)
  cfg = RolloutConfig(branching=(2,), max_turns=2, max_new_tokens=3, max_length=1024,
                      sampling=SamplingParams(1.0, vocab_limit=128))
  groups = tree_rollout(Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=256),
                        prepare_params(init_params(config, jax.random.key(0)), config),
                        OpenEndedEnv, [0], tokenizer, jax.random.key(2), cfg)
  assert [e.reward for e in groups[0]] == [0.25, 0.25]
  # Each branch is scored once, off the main thread: the pool task that steps the environment
  # when the sample ends also scores a cut-off.
  assert finishes == [False, False]
