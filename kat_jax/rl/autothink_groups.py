"""Step-SRPO's rollout groups: sample a group per prompt on the rollout engine, force the
other mode on part of single-mode groups, and score every sample as soon as it is final.

`rollout_round` is one round of that for a batch of prompts (`rollouts.StepSRPORollouts`
draws the prompts and packs the result); rewards are streamed to the reward pool while the
rest of the round still generates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from kat_jax.data.chat_template import parse_autothink_response, tokenize_chat
from kat_jax.rl import step_srpo
from kat_jax.rl.objectives import overlong_penalty
from kat_jax.rl.pipeline import RolloutWeights
from kat_jax.tasks import dual_regime as task_lib
from kat_jax.tasks.rewards import RewardPool


@dataclasses.dataclass
class Sample:
  """One rollout of a group: response ids (a forced mode's prefill first), the prefill
  length, whether the mode was forced, and per sampled token (ids[prefill:]) the behaviour
  log-prob and the weight version it was sampled with."""
  ids: list[int]
  prefill: int
  forced: bool
  logprobs: np.ndarray
  versions: np.ndarray


class AutoThinkRollouts:
  """Samples AutoThink rollout groups on the rollout engine, streaming finished samples."""

  def __init__(self, model_config, tokenizer, rl: ConfigDict):
    from kat_jax.sampling import (EngineSampler,  # pylint: disable=g-import-not-at-top
                                  SamplingParams, think_mode_prompts)
    # A group's samples share the prompt's pages, and a slot is refilled as soon as its
    # sample stops (think-off answers do not wait for think-on chains).
    self.sampler = EngineSampler(model_config, pad_id=tokenizer.pad_id, num_slots=64)
    # Behaviour log-probs of the tempered policy the loss trains (rl.temperature).
    self.sampling = SamplingParams(temperature=rl.temperature, vocab_limit=tokenizer.vocab_size,
                                   tempered_stats=True)
    self.tokenizer, self.rl, self._force = tokenizer, rl, think_mode_prompts
    self.model_config = model_config

  def prompt_ids(self, task: task_lib.Task) -> list[int]:
    return tokenize_chat(self.tokenizer, [{"role": "user", "content": task.prompt}],
                         add_generation_prompt=True, template="kat").ids

  def _sample(self, weights: RolloutWeights, prompts, key, num_samples, on_finish):
    dparams, version = weights.current()
    self.sampler.generate(dparams, prompts, key, max_new_tokens=self.rl.max_new_tokens,
                          sampling=self.sampling, stop_ids=self.tokenizer.stop_ids,
                          num_samples=num_samples, version=version, on_finish=on_finish)

  def groups(self, weights: RolloutWeights, tasks, key, cfg: step_srpo.StepSRPOConfig,
             on_final: Callable[[int, int, Sample], None]):
    """-> (prompts, groups[task][g] = Sample). on_final(task, g, sample) is called once per
    sample as soon as it is final: when it is sampled (an index no forced mode can replace),
    when its group's forced rollouts are decided (it keeps its rollout), or when its forced
    rollout ends."""
    key, forced_key = jax.random.split(key)
    prompts = [self.prompt_ids(t) for t in tasks]
    g = self.rl.group_size
    groups: list[list[Sample | None]] = [[None] * g for _ in tasks]
    pending = [g] * len(tasks)
    forced_of: dict[int, list[tuple[int, str]]] = {}
    forcible = step_srpo.forcible(g, cfg.force_fraction)

    def sampled(row: int, c) -> None:
      i, j = divmod(row, g)
      groups[i][j] = Sample(list(c.tokens), 0, False, c.logprobs, c.versions)
      if j not in forcible:
        on_final(i, j, groups[i][j])
      pending[i] -= 1
      if pending[i]:
        return
      # The group is complete: decide its forced rollouts, release the others to scoring.
      forced_of[i] = step_srpo.forced_rollouts([self.mode(x.ids) for x in groups[i]],
                                               cfg.force_fraction)
      replaced = {j for j, _ in forced_of[i]}
      for j in forcible:
        if j not in replaced:
          on_final(i, j, groups[i][j])

    self._sample(weights, prompts, key, g, sampled)
    # Forced rollouts, in group order (their keys do not depend on completion order).
    jobs = [(i, j, mode) for i in range(len(tasks)) for j, mode in forced_of.get(i, [])]
    if jobs:
      forced_prompts = [self._force(self.tokenizer, [prompts[i]], "on" if m == "think_on"
                                    else "off")[0] for i, _, m in jobs]

      def forced(row: int, c) -> None:
        i, j, _ = jobs[row]
        prefill = forced_prompts[row][len(prompts[i]):]
        groups[i][j] = Sample(prefill + list(c.tokens), len(prefill), True, c.logprobs,
                              c.versions)
        on_final(i, j, groups[i][j])

      self._sample(weights, forced_prompts, forced_key, 1, forced)
    return prompts, groups

  def text(self, ids) -> str:
    stops = set(self.tokenizer.stop_ids)
    return self.tokenizer.decode([t for t in ids if t not in stops])

  def mode(self, ids) -> str | None:
    return parse_autothink_response(self.text(ids), judge_prefilled=True)["mode"]


def rollout_round(rollouts: AutoThinkRollouts, weights: RolloutWeights,
                   tasks: list[task_lib.Task], key, reward_pool: RewardPool,
                   srpo_cfg: step_srpo.StepSRPOConfig, mode_tags: list[int], rl: ConfigDict
                   ) -> dict[str, Any]:
  """Samples, verifies and scores one batch of prompt groups.

  Returns per group (lists of length len(tasks)): tasks, prompts, groups [Sample] x G, srpo
  (Rollouts), advantages ([G] per-token arrays); results (flat RewardResults of all rollouts,
  group-major) and timings: generate_s, reward_wait_s (after the last sample ended).
  """
  g = rl.group_size
  scores: dict[tuple[int, int], Any] = {}

  def score(i: int, j: int, sample: Sample) -> None:  # streamed: a final sample is scored now
    scores[i, j] = reward_pool.score_async([{"response": rollouts.text(sample.ids),
                                             "verifier": tasks[i].verifier}])

  start = time.perf_counter()
  prompts, groups = rollouts.groups(weights, tasks, key, srpo_cfg, score)
  generated = time.perf_counter()
  results = [scores[i, j].result()[0] for i in range(len(tasks)) for j in range(g)]
  reward_wait = time.perf_counter() - generated
  parsed = [[parse_autothink_response(rollouts.text(x.ids), judge_prefilled=True)
             for x in group] for group in groups]
  it = iter(r.reward for r in results)
  srpo = []
  for ps, group in zip(parsed, groups):
    penalties = np.zeros(len(group))
    if rl.overlong_buffer:  # DAPO soft overlong punishment on the sampled length
      penalties = overlong_penalty(np.array([len(x.ids) - x.prefill for x in group]),
                                   rl.max_new_tokens, rl.overlong_buffer,
                                   rl.overlong_penalty_factor)
    srpo.append([step_srpo.Rollout(p["mode"], x.forced, float(next(it)), p["well_formed"],
                                   float(pen))
                 for p, x, pen in zip(ps, group, penalties)])
  advantages, _ = step_srpo.token_advantages(srpo, [[x.ids for x in grp] for grp in groups],
                                             mode_tags, srpo_cfg)
  return {"tasks": list(tasks), "prompts": prompts, "groups": groups, "srpo": srpo,
          "advantages": advantages, "results": results,
          "generate_s": generated - start, "reward_wait_s": reward_wait}
