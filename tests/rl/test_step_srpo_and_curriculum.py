"""Step-SRPO judge/answer rewards and segment advantages; SRPO schedule and resampling."""

import json

import numpy as np
import pytest

from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import group_advantages, overlong_penalty
from kat_jax.rl.rollouts import select_groups
from kat_jax.rl.step_srpo import (Rollout, StepSRPOConfig, forced_rollouts, group_rewards,
                                  has_signal, judge_segment_length, preferred_mode,
                                  token_advantages)

ON, OFF = "think_on", "think_off"


def test_preferred_mode_prefers_cheap_mode_unless_reasoning_helps():
  easy = [Rollout(ON, False, 1, True), Rollout(OFF, False, 1, True)]
  hard = [Rollout(ON, False, 1, True), Rollout(OFF, False, 0, True)]
  assert preferred_mode(easy, margin=0.0) == OFF
  assert preferred_mode(hard, margin=0.0) == ON
  assert preferred_mode([Rollout(ON, False, 1, True)] * 3, margin=0.0) is None
  assert preferred_mode([Rollout(ON, False, 0, True), Rollout(OFF, False, 0, True)], 0.0) is None
  # with a margin, think_off may be a bit less accurate and still preferred
  close = [Rollout(ON, False, 1, True), Rollout(ON, False, 1, True),
           Rollout(OFF, False, 1, True), Rollout(OFF, False, 0, True)]
  assert preferred_mode(close, margin=0.6) == OFF


def test_forcing_only_for_single_mode_groups():
  assert forced_rollouts([ON, ON, ON, ON], 0.25) == [(3, OFF)]
  assert forced_rollouts([OFF, OFF, None, OFF], 0.5) == [(2, ON), (3, ON)]
  assert forced_rollouts([ON, OFF, ON, ON], 0.25) == []


def test_group_rewards_by_hand():
  cfg = StepSRPOConfig(wrong_mode_scale=0.5, format_penalty=1.0)
  group = [Rollout(ON, False, 1.0, True),   # chose on, preferred is on -> +1
           Rollout(OFF, False, 0.0, True),  # chose off -> -1
           Rollout(OFF, True, 1.0, True),   # forced: judge not trained, reward 0
           Rollout(ON, False, 1.0, False)]  # malformed format -> penalty
  # acc on = (1 + 1)/2 = 1, acc off = (0 + 1)/2 = 0.5 -> think_on preferred
  judge, answer, trainable = group_rewards(group, cfg)
  np.testing.assert_array_equal(judge, [1, -1, 0, 1])
  np.testing.assert_array_equal(answer, [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(trainable, [True, True, False, True])


def test_segment_advantages():
  cfg = StepSRPOConfig()
  tags = (900, 901)  # <think_on>, <think_off>
  group = [Rollout(ON, False, 1.0, True), Rollout(OFF, False, 0.0, True),
           Rollout(OFF, True, 0.0, True)]
  responses = [[5, 6, 900, 7, 8], [5, 901, 9], [901, 3, 3]]
  assert judge_segment_length(responses[0], tags) == 3
  assert judge_segment_length([1, 2], tags) == 0
  advs, stats = token_advantages([group], [responses], tags, cfg)
  judge, answer, _ = group_rewards(group, cfg)
  answer_adv = group_advantages(answer, np.zeros(3))
  judge_adv = group_advantages(judge[:2], np.zeros(2))
  np.testing.assert_allclose(advs[0][0], [judge_adv[0]] * 3 + [answer_adv[0]] * 2)
  np.testing.assert_allclose(advs[0][1], [judge_adv[1]] * 2 + [answer_adv[1]])
  np.testing.assert_allclose(advs[0][2], [0.0] + [answer_adv[2]] * 2)  # forced judge untrained
  assert stats["judge_reward"] == 0.0
  flat = token_advantages([group], [responses], tags,
                          StepSRPOConfig(intermediate_supervision=False))[0]
  combined = group_advantages(answer + 0.5 * judge, np.zeros(3))
  for i in range(3):
    np.testing.assert_allclose(flat[0][i], combined[i])


def test_two_stage_mix_switches_domains():
  mix = TwoStageMix({"math": 1.0}, {"math": 0.5, "code": 0.5}, switch_step=10)
  rng = np.random.default_rng(0)
  assert set(mix.sample_domains(3, 50, rng)) == {"math"}
  assert set(mix.sample_domains(10, 200, rng)) == {"math", "code"}
  assert (mix.stage(9), mix.stage(10)) == (1, 2)
  # a kind without prompts left is left out and the others renormalised
  assert set(mix.sample_domains(10, 50, rng, available=lambda k: k != "math")) == {"code"}
  with pytest.raises(ValueError, match="no positive weight left"):
    mix.sample_domains(3, 1, rng, available=lambda k: k != "math")


def test_overlong_shaping_enters_the_answer_reward():
  penalty = overlong_penalty(np.array([10, 16]), max_length=16, buffer=4)  # [0, -1]
  group = [Rollout(ON, False, 1.0, True, float(penalty[0])),
           Rollout(ON, False, 1.0, True, float(penalty[1]))]
  _, answer, _ = group_rewards(group, StepSRPOConfig())
  np.testing.assert_array_equal(answer, [1.0, 0.0])


def test_dynamic_sampling_keeps_groups_with_signal():
  flat = [np.zeros(3), np.zeros(2)]
  judged = [np.array([0.7, 0.0]), np.array([-0.7, 0.0])]  # judge segment only
  answered = [np.ones(2), -np.ones(2)]
  assert not has_signal(flat) and has_signal(judged) and has_signal(answered)
  advantages = [flat, judged, flat, answered, judged]
  assert select_groups(advantages, count=2, dynamic=True) == [1, 3]
  assert select_groups(advantages, count=9, dynamic=True) == [1, 3, 4]
  assert select_groups(advantages, count=2, dynamic=False) == [0, 1, 2, 3, 4]
  # an all-correct group of one mode (no judge signal) gives no advantage at all
  solved = [Rollout(ON, False, 1.0, True)] * 3
  advs, _ = token_advantages([solved], [[[900, 5]] * 3], (900, 901), StepSRPOConfig())
  assert not has_signal(advs[0])


def test_epochs_draw_without_replacement():
  pool = HistoryResampler([f"p{i}" for i in range(5)], seed=3)
  rng = np.random.default_rng(0)
  everything = lambda p: True  # noqa: E731
  first = [pool.draw(everything, rng) for _ in range(5)]
  assert sorted(first) == [f"p{i}" for i in range(5)] and not pool.epoch_complete
  assert pool.draw(everything, rng) in first and pool.epoch_complete  # used up: fallback
  pool.end_epoch()
  second = [pool.draw(everything, rng) for _ in range(5)]
  assert sorted(second) == sorted(first) and second != first  # reshuffled per epoch
  # a kind runs out before the others: the epoch completes there
  pool = HistoryResampler(["a1", "a2", "b1", "b2", "b3"])
  only_a = lambda p: p.startswith("a")  # noqa: E731
  assert {pool.draw(only_a, rng), pool.draw(only_a, rng)} == {"a1", "a2"}
  assert not pool.epoch_complete
  assert pool.draw(only_a, rng) in ("a1", "a2") and pool.epoch_complete
  assert pool.draw(lambda p: p == "zzz", rng) is None


def test_resampler_state_round_trip_and_never_empties():
  pool = HistoryResampler(["a", "b", "c", "d"], seed=1)
  rng = np.random.default_rng(0)
  drawn = [pool.draw(lambda p: True, rng) for _ in range(2)]
  pool.record(drawn[0], [1, 1])
  restored = HistoryResampler([], seed=0)
  restored.load_state_dict(json.loads(json.dumps(pool.state_dict())))
  # the restored pool continues the same epoch: same remaining order, same history
  def rest(p):
    return [p.draw(lambda _: True, np.random.default_rng(1)) for _ in range(2)]

  remaining = rest(pool)
  assert rest(restored) == remaining and not set(remaining) & set(drawn)
  assert restored.end_epoch() == pool.end_epoch()
  assert restored.active == pool.active and drawn[0] not in pool.active
  with pytest.raises(ValueError, match="bad HistoryResampler state"):
    restored.load_state_dict({"seed": 0})
  pool = HistoryResampler(["x", "y"])
  pool.record("x", [1])
  pool.record("y", [1, 1])
  assert pool.end_epoch()["dropped"] == 0 and pool.active == ["x", "y"]  # nothing left else
  pool.record("x", [1])
  assert pool.end_epoch(drop=False)["dropped"] == 0


def test_history_resampling_drops_only_all_correct():
  pool = HistoryResampler(["easy", "mixed", "hard", "unseen"])
  pool.record("easy", [1, 1, 1])
  pool.record("mixed", [1, 0, 1])
  pool.record("hard", [0, 0, 0])
  summary = pool.end_epoch()
  assert pool.active == ["mixed", "hard", "unseen"] and pool.dropped == ["easy"]
  assert summary == {"epoch": 0, "kept": 3, "dropped": 1, "all_wrong_kept": 1}
