"""The trajectory manager: longest-prefix trees equal `build_trees` on the same trajectories."""

import jax
import numpy as np
import pytest

from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.rollout import RolloutConfig, tree_rollout
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.rl.tree import TREE_KEYS, Trajectory, build_trees, pack_trees
from kat_jax.sampling import Engine, Sampler, SamplingParams, prepare_params

OBJECTIVE = ObjectiveConfig(loss_agg_mode="seq-mean-token-mean")


def _assert_same_trees(expected: list[list[Trajectory]], got: list[list[Trajectory]]):
  """Every layout array of the two forests, and their packed rows, are identical."""
  want, have = build_trees(expected, OBJECTIVE), build_trees(got, OBJECTIVE)
  for a, b in zip(want, have):
    la, lb = a.layout(), b.layout()
    assert la.keys() == lb.keys()
    for key in la:
      np.testing.assert_array_equal(la[key], lb[key], err_msg=key)
  seq_len = max(t.num_nodes for t in want)
  pa, pb = pack_trees(want, seq_len, 0), pack_trees(have, seq_len, 0)
  for key in TREE_KEYS:
    np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def test_tree_rollout_records_turns_whose_trees_equal_build_trees_of_the_episodes(
    monkeypatch):
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1, initializer_range=0.3)
  dparams = prepare_params(init_params(config, jax.random.key(0)), config)
  sampler = Sampler(config, pad_id=tokenizer.pad_id, prefill_chunk=128)
  # vocab_limit 128 keeps <|im_end|> out of reach: every turn is cut, so every episode
  # holds a forced end-of-turn token (context) between its turns and after its last one.
  cfg = RolloutConfig(branching=(3, 2), max_turns=2, max_new_tokens=4, max_length=512,
                      sampling=SamplingParams(1.0, vocab_limit=128))
  # Weight versions as an engine stamps them (`Completion.versions`): 5 on turn 0 (requests 0
  # and 1, one per task), 6 on turn 1.
  take = Engine.take_finished

  def take_with_versions(self):
    done = take(self)
    for completion in done.values():
      completion.versions = np.full(len(completion.tokens), 5 + (completion.request >= 2),
                                    np.int32)
    return done

  monkeypatch.setattr(Engine, "take_finished", take_with_versions)
  manager = TrajectoryManager()
  # DigitsEnv: two turns, a user message between them (context, mask 0).
  groups = tree_rollout(sampler, dparams, DigitsEnv, [0, 1], tokenizer, jax.random.key(3), cfg,
                        manager=manager)
  assert [len(g) for g in groups] == [6, 6] and manager.num_interactions == 2 * (3 + 6)
  assert sorted(manager.groups_done()) == sorted({g[0].record_group for g in groups})
  rng = np.random.default_rng(0)
  expected, got = [], []
  for episodes in groups:
    recorded = manager.trajectories(episodes[0].record_group)
    assert len(recorded) == len(episodes)
    advantages = rng.normal(size=len(episodes))
    for e, t in zip(episodes, recorded):
      assert t.interactions[-1] == e.last_interaction and len(t.interactions) == 2
      np.testing.assert_array_equal(t.tokens, e.tokens)
      np.testing.assert_array_equal(t.loss_mask, e.loss_mask)
      np.testing.assert_array_equal(t.logprobs, np.float32(e.logprobs))
      np.testing.assert_array_equal(t.entropies, np.float32(e.entropies))
      generated = np.flatnonzero(t.loss_mask)
      assert len(generated) == 8  # two turns of max_new_tokens
      np.testing.assert_array_equal(t.versions[generated], [5] * 4 + [6] * 4)
      assert np.all(t.versions[t.loss_mask == 0] == -1)
      assert t.reward == e.reward
    expected.append([e.trajectory(a) for e, a in zip(episodes, advantages)])
    got.append([t.to_trajectory(a) for t, a in zip(recorded, advantages)])
  _assert_same_trees(expected, got)


def _logp(context: tuple) -> np.float32:
  """A log-prob that depends on the context only, as a behaviour policy's does."""
  return np.float32(-0.05 - (hash(context) % 1009) / 97.0)


def _ids(rng, low: int, high: int) -> list[int]:
  return [int(t) for t in rng.integers(1000, 100_000, rng.integers(low, high))]


def _extend(episode: dict, ids, generated: bool, logprobs=None, versions=None, entropies=None,
            interaction=None) -> dict:
  n = len(ids)
  return {"tokens": episode["tokens"] + ids,
          "loss_mask": episode["loss_mask"] + [int(generated)] * n,
          "logprobs": episode["logprobs"] + (logprobs or [0.0] * n),
          "versions": episode["versions"] + (versions or [-1] * n),
          "entropies": episode["entropies"] + (entropies or [0.0] * n),
          "interactions": episode["interactions"] + ((interaction,) if generated else ())}


def _random_groups(seed: int, num_groups: int = 3):
  """Hand-made 3-turn interaction trees, recorded turn by turn as a rollout does: each live
  episode forks into 1-3 samples (siblings often share their first sampled tokens, with one
  log-prob), ends with a reward (always after turn 3) or gets a tool output.

  Returns (manager, per group the expected trajectories in depth-first (branch) order).
  """
  rng = np.random.default_rng(seed)
  manager = TrajectoryManager()
  expected = []
  for group in range(num_groups):
    empty = {k: [] for k in ("tokens", "loss_mask", "logprobs", "versions", "entropies")}
    live = {(): _extend(dict(empty, interactions=()), _ids(rng, 2, 6), False)}
    leaves = {}
    for turn in range(3):
      next_live = {}
      for path, episode in live.items():
        common = _ids(rng, 0, 3)
        for c in range(int(rng.integers(1, 4))):
          completion = common + _ids(rng, 1, 4)
          logprobs = [float(_logp((group, *episode["tokens"], *completion[:i + 1])))
                      for i in range(len(completion))]
          versions = [turn] * len(completion)
          entropies = [float(np.float32(rng.random())) for _ in completion]
          iid = manager.record(group, episode["tokens"], completion, logprobs, versions,
                               entropies)
          child = _extend(episode, completion, True, logprobs, versions, entropies, iid)
          if turn == 2 or rng.random() < 0.3:
            child["reward"] = float(rng.normal())
            manager.set_reward(iid, child["reward"])
            leaves[path + (c,)] = child
          else:
            next_live[path + (c,)] = _extend(child, _ids(rng, 1, 5), False)
      live = next_live
    expected.append([leaves[p] for p in sorted(leaves)])
  return manager, expected


@pytest.mark.parametrize("seed", range(4))
def test_random_trees_are_rebuilt_exactly_in_depth_first_order(seed):
  manager, expected = _random_groups(seed)
  rng = np.random.default_rng(seed + 100)
  want, got = [], []
  for group, leaves in enumerate(expected):
    recorded = manager.trajectories(group)
    assert len(recorded) == len(leaves)
    for t, leaf in zip(recorded, leaves):
      assert t.interactions == leaf["interactions"] and t.reward == leaf["reward"]
      for key in ("tokens", "loss_mask", "logprobs", "versions", "entropies"):
        np.testing.assert_array_equal(getattr(t, key), np.asarray(leaf[key], getattr(
            t, key).dtype), err_msg=key)
    advantages = [rng.normal(size=len(leaf["tokens"])) for leaf in leaves]  # per token
    want.append([Trajectory(leaf["tokens"], leaf["loss_mask"], a, leaf["logprobs"])
                 for leaf, a in zip(leaves, advantages)])
    got.append([t.to_trajectory(a) for t, a in zip(recorded, advantages)])
    assert manager.pending(group) == []
  _assert_same_trees(want, got)


def test_longest_recorded_prefix_is_the_parent_not_the_first_or_the_latest():
  manager = TrajectoryManager()
  p = [1, 2, 3]
  a = manager.record(0, p, [10], [-1.0])  # P + [10]
  b = manager.record(0, p + [10, 50], [11], [-2.0])  # continues a after tool token 50
  d = manager.record(0, p, [10, 50], [-1.0, -3.0])  # P + [10, 50]: shorter than b's end
  c = manager.record(0, p + [10, 50, 11, 60], [12, 13], [-4.0, -5.0])
  traj = {t.interactions[-1]: t for t in manager.trajectories(0)}
  assert list(traj) == [c, d]  # a and b are continued; depth first: a's subtree, then d
  assert traj[c].interactions == (a, b, c)
  np.testing.assert_array_equal(traj[c].loss_mask, [0, 0, 0, 1, 0, 1, 0, 1, 1])
  np.testing.assert_array_equal(traj[c].logprobs, [0, 0, 0, -1, 0, -2, 0, -4, -5])
  assert traj[d].interactions == (d,)
  np.testing.assert_array_equal(manager.prompt(c), p + [10, 50, 11, 60])


def test_forced_prefix_and_tool_output_tokens_are_context():
  manager = TrajectoryManager()
  prompt, on, off = [5, 6, 7], 90, 91
  sampled = manager.record(0, prompt, [on, 20, 21], [-0.5, -0.25, -0.125])
  # Step-SRPO forcing: the mode tag prefilled (context), in one case the tag another
  # sample drew at the same position; the sampled tag keeps its log-prob, trained there.
  forced_off = manager.record(0, prompt + [off], [22, 23], [-1.0, -1.5])
  forced_on = manager.record(0, prompt + [on], [24], [-2.0])
  turn2 = manager.record(0, prompt + [on, 20, 21, 70, 71], [25], [-3.0])  # tool output 70 71
  for iid in (forced_off, forced_on, turn2):
    manager.set_reward(iid, 1.0)
  assert manager.pending(0) == [] and manager.groups_done() == [0]
  by_leaf = {t.interactions[-1]: t for t in manager.trajectories(0)}
  assert sorted(by_leaf) == [forced_off, forced_on, turn2]  # `sampled` is continued
  for iid, prefill, ids in ((forced_off, 1, [off, 22, 23]), (forced_on, 1, [on, 24])):
    # the mask Step-SRPO's packer builds from (response ids, prefill length)
    np.testing.assert_array_equal(by_leaf[iid].loss_mask,
                                  [0] * (len(prompt) + prefill) + [1] * (len(ids) - prefill))
    np.testing.assert_array_equal(by_leaf[iid].tokens, prompt + ids)
  np.testing.assert_array_equal(by_leaf[turn2].loss_mask, [0, 0, 0, 1, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(by_leaf[turn2].versions, [-1, -1, -1, 0, 0, 0, -1, -1, 0])
  layout = build_trees([[t.to_trajectory(1.0) for t in by_leaf.values()]],
                       OBJECTIVE)[0].layout()
  tag = np.flatnonzero(layout["tokens"] == on)[0]  # one node, trained by `sampled`'s chain
  assert layout["visits"][tag] == 2 and layout["old_logp"][tag] == np.float32(-0.5)
  assert layout["kl_weight"][tag] > 0


def test_identical_samples_share_one_node_and_each_continuation_is_a_trajectory():
  manager = TrajectoryManager()
  first = [manager.record(0, [1, 2], [3, 4], [-0.5, -0.5]) for _ in range(2)]  # same sample
  leaves = [manager.record(0, [1, 2, 3, 4, 9], [c], [-1.0]) for c in (5, 6, 7, 8)]
  ended = manager.record(0, [1, 2], [3, 4], [-0.5, -0.5])  # identical, but its episode ended
  manager.set_reward(ended, 0.5, suffix=[99])
  assert manager.pending(0) == leaves
  trajectories = manager.trajectories(0)
  assert [t.interactions for t in trajectories] == [(first[0], i) for i in leaves] + [(ended,)]
  np.testing.assert_array_equal(trajectories[-1].tokens, [1, 2, 3, 4, 99])
  np.testing.assert_array_equal(trajectories[-1].loss_mask, [0, 0, 1, 1, 0])


def test_state_round_trip_reproduces_trajectories_bit_for_bit():
  manager, _ = _random_groups(7)
  rng = np.random.default_rng(1)
  iid = manager.record(1, [3, 4], [5], rng.normal(size=1).astype(np.float32))  # pending leaf
  manager.set_reward(iid, float(rng.normal()), suffix=[8])
  manager.drop(2)
  restored = TrajectoryManager()
  restored.set_state(manager.get_state())
  assert restored.num_interactions == manager.num_interactions
  assert restored.groups() == manager.groups() == [0, 1]
  for group in (0, 1):
    assert restored.pending(group) == manager.pending(group)
    for a, b in zip(manager.trajectories(group), restored.trajectories(group), strict=True):
      assert a.interactions == b.interactions and a.reward == b.reward
      for key in ("tokens", "loss_mask", "logprobs", "versions", "entropies"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), key
  # Both continue alike: the same next ids and groups.
  assert restored.new_group() == manager.new_group() == 3
  assert restored.record(0, [1], [2], [-1.0]) == manager.record(0, [1], [2], [-1.0])


def test_conflicting_logprobs_on_a_shared_generated_token_raise_and_record_nothing():
  manager = TrajectoryManager()
  manager.record(0, [1, 2], [3, 4], [-0.5, -0.7])
  manager.record(0, [1, 2], [3, 5], [-0.5 + 5e-5, -0.1])  # same context, within tolerance
  with pytest.raises(ValueError, match=r"completion token 1 .* log-prob -0\.7.* one log-prob"):
    manager.record(0, [1, 2], [3, 4, 6], [-0.5, -0.6, -0.1])
  assert manager.num_interactions == 2 and len(manager.trajectories(0)) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(logprobs=[-1.0]), "logprobs has 1 entries, completion has 2 tokens"),
    (dict(versions=[0, 0, 0]), "versions has 3 entries, completion has 2 tokens"),
    (dict(entropies=[0.1]), "entropies has 1 entries, completion has 2 tokens"),
    (dict(versions=[0, -2]), "versions must be >= 0"),
    (dict(completion=[]), "completion is empty"),
    (dict(prompt=[[1, 2]]), "prompt must be 1-D"),
    (dict(prompt=[-1]), "prompt holds token ids outside"),
    (dict(logprobs=[-1.0, np.nan]), "logprobs holds a non-finite value"),
])
def test_bad_record_inputs_raise_naming_the_field(kwargs, message):
  args = dict(group=0, prompt=[1, 2], completion=[3, 4], logprobs=[-1.0, -1.0])
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    TrajectoryManager().record(**args)


def test_drop_forgets_a_group_and_unknown_ids_are_key_errors():
  manager = TrajectoryManager()
  group = manager.new_group()
  iid = manager.record(group, [1], [2], [-1.0])
  manager.drop(group)
  assert manager.num_interactions == 0 and manager.groups() == []
  with pytest.raises(KeyError, match=f"no interaction {iid}"):
    manager.set_reward(iid, 1.0)
  with pytest.raises(KeyError, match=f"no group {group}"):
    manager.trajectories(group)
