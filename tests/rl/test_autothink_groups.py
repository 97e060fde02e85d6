"""Step-SRPO's rollout groups stream their samples to scoring: a sample no forced mode can
replace is final the moment it is sampled; the others when their group's forced rollouts are
decided or their forced rollout ends."""

import jax

from experiments.configs.step_srpo import get_config
from kat_jax.checkpoint import models
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.rl import step_srpo
from kat_jax.rl.autothink_groups import AutoThinkRollouts
from kat_jax.rl.pipeline import RolloutWeights
from kat_jax.sampling import prepare_params
from kat_jax.tasks import dual_regime as task_lib


def test_samples_are_final_as_soon_as_no_forced_mode_can_replace_them():
  config = get_config()
  config.rl.update(group_size=4, max_new_tokens=12, temperature=1.0)
  model_config, params = models.load_configured_model(config.model, seed=0)
  rollouts = AutoThinkRollouts(model_config, get_tokenizer(config.data.tokenizer), config.rl)
  weights = RolloutWeights(lambda p: p)
  weights.push(prepare_params(params, model_config), 0)
  weights.attach(rollouts.sampler)
  srpo_cfg = step_srpo.StepSRPOConfig(force_fraction=0.5)
  events, finished = [], []  # (kind, task, index, samples ended so far)
  generate = rollouts.sampler.generate

  def counting_generate(*args, on_finish, **kwargs):
    def count(row, completion):
      finished.append(row)
      on_finish(row, completion)
    return generate(*args, on_finish=count, **kwargs)

  rollouts.sampler.generate = counting_generate
  tasks = task_lib.generate_tasks(3, 7, hard_fraction=0.5)
  _, groups = rollouts.groups(weights, tasks, jax.random.key(0), srpo_cfg,
                              lambda i, j, s: events.append((i, j, len(finished), s.forced)))
  g = config.rl.group_size
  forcible = step_srpo.forcible(g, srpo_cfg.force_fraction)
  assert list(forcible) == [2, 3]
  assert sorted((i, j) for i, j, _, _ in events) == [(i, j) for i in range(3) for j in range(g)]
  first_round = finished[:3 * g]
  assert any(forced for *_, forced in events)  # the forced path ran (one group had one mode)
  for i, j, seen, forced in events:
    if j not in forcible:  # final when sampled: right after its own completion
      assert not forced and first_round.index(i * g + j) == seen - 1
    elif not forced:  # final when its whole group had been sampled
      last_of_group = max(first_round.index(i * g + k) for k in range(g))
      assert seen == last_of_group + 1
    else:  # its forced rollout replaced it, in the second round
      assert seen > 3 * g and groups[i][j].forced
