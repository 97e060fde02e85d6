"""Step-SRPO judge/answer rewards and segment advantages; SRPO schedule and resampling."""

import numpy as np

from kat_jax.rl.curriculum import HistoryResampler, TwoStageMix
from kat_jax.rl.objectives import group_advantages
from kat_jax.rl.step_srpo import (Rollout, StepSRPOConfig, forced_rollouts, group_rewards,
                                  judge_segment_length, preferred_mode, token_advantages)

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


def test_history_resampling_drops_only_all_correct():
  pool = HistoryResampler(["easy", "mixed", "hard", "unseen"])
  pool.record("easy", [1, 1, 1])
  pool.record("mixed", [1, 0, 1])
  pool.record("hard", [0, 0, 0])
  summary = pool.end_epoch()
  assert pool.active == ["mixed", "hard", "unseen"] and pool.dropped == ["easy"]
  assert summary == {"kept": 3, "dropped": 1, "all_wrong_kept": 1}
