"""The step_srpo stage runs end to end (tiny random model) and writes its curves and summary.

One run covers the non-default paths at once (each stage run costs a compile): KL against the
frozen reference (beta > 0, several steps), two updates per rollout batch, DAPO overlong
shaping, the two-stage domain mix with its switch, epochs and history resampling, and the
resampler state surviving a resume.
"""

import concurrent.futures
import json
import os

import numpy as np
import pytest

from experiments.configs.step_srpo import get_config
from kat_jax.tasks import dual_regime as task_lib
from kat_jax.errors import ConfigError
from kat_jax.rl import rollouts as rollouts_lib
from kat_jax.rl import stage as stage_lib
from kat_jax.tasks.rewards import RewardPool, RewardResult
from kat_jax.rl.stage import run_step_srpo


def _config(tmp_path):
  config = get_config()
  config.workdir = str(tmp_path / "rl")
  config.model.num_layers = 1
  config.rl.steps = 2
  config.rl.prompts_per_step = 2
  config.rl.group_size = 3
  config.rl.max_new_tokens = 16
  config.rl.eval_prompts = 2
  config.train.tensorboard = False
  return config


class _MathAlwaysRight(RewardPool):
  """Real scoring, except that every math rollout is graded correct (so math prompts are
  all-correct and history resampling must drop them)."""

  def score_async(self, items):
    real = super().score_async(items).result()
    out = [RewardResult(1.0, "ok", "math") if item["verifier"]["type"] == "math" else r
           for item, r in zip(items, real)]
    future = concurrent.futures.Future()
    future.set_result(out)
    return future


def test_stage_end_to_end_with_kl_schedule_resampling_and_resume(tmp_path, monkeypatch):
  monkeypatch.setattr(stage_lib, "RewardPool", _MathAlwaysRight)
  config = _config(tmp_path)
  config.rl.update(num_tasks=6, steps=3, group_size=2, updates_per_batch=2,
                   stage1_mix="math:1", stage2_mix="math:1,code:1", switch_step=2,
                   overlong_buffer=4)
  config.rl.objective.beta = 0.04
  tasks = task_lib.generate_tasks(6, config.rl.task_seed, hard_fraction=config.rl.hard_fraction)
  math_ids = {t.id for t in tasks if t.domain == "math"}
  code_ids = {t.id for t in tasks if t.domain == "code"}
  # The run below is laid out for this pool: stage 1 (2 prompts a step) uses up the math
  # prompts in step 1, so the epoch ends after step 2 and drops them (all correct).
  assert len(math_ids) == 2 and code_ids, [t.domain for t in tasks]
  real_next, batches = rollouts_lib.StepSRPORollouts.next, []

  def spy(self, state, step):
    work = real_next(self, state, step)
    batches.append(work.batch)
    return work

  monkeypatch.setattr(rollouts_lib.StepSRPORollouts, "next", spy)
  summary = run_step_srpo(config)
  # Two updates per batch: their proximal log-probs come from a pass of their own, fixed
  # across both updates (one update per batch takes them in its own forward pass).
  assert batches and all(b is None or "old_logp" in b for b in batches)
  assert any(b is not None for b in batches)
  workdir = tmp_path / "rl"
  history = json.loads((workdir / "rl_curves.json").read_text())["history"]
  assert [h["step"] for h in history] == [1, 2, 3]
  assert [h["policy_updates"] for h in history] == [2, 4, 6]  # 2 updates per batch
  for h in history:
    assert 0.0 <= h["format_rate"] <= 1.0 and h["response_tokens"] > 0
    assert np.isfinite(h["kl"]) and h["kl"] >= 0.0  # k3 against the frozen reference
    assert h["reward_timeouts"] >= 0 and h["reward_errors"] >= 0
    assert -1.0 <= h["overlong_penalty"] <= 0.0
  assert min(h["overlong_penalty"] for h in history) < 0.0  # 16-token rollouts hit the buffer
  # stage 1: math only, drawn without replacement within the epoch
  assert [h["mix_stage"] for h in history] == [1, 1, 2]
  assert set(history[0]["prompt_ids"]) == math_ids
  assert set(history[1]["prompt_ids"]) <= math_ids
  # end of epoch 0 (math used up): both all-correct math prompts dropped, the rest kept
  assert history[0]["resampling"] is None
  assert history[1]["resampling"] == {"epoch": 0, "kept": 4, "dropped": 2, "all_wrong_kept": 0}
  assert history[1]["active_prompts"] == 4 and history[2]["epoch"] >= 1
  # stage 2 asks for math and code, but every math prompt is gone: code only
  assert set(history[2]["prompt_ids"]) <= code_ids
  assert os.path.getsize(workdir / "rl_curves.png") > 0
  assert summary["heldout"]["num_prompts"] == 2
  assert json.loads((workdir / "rl_summary.json").read_text())["last"]["step"] == 3

  config.rl.steps = 4  # resume: the checkpoint restores the prompt pool (math stays dropped)
  run_step_srpo(config)
  history = json.loads((workdir / "rl_curves.json").read_text())["history"]
  assert [h["step"] for h in history] == [1, 2, 3, 4]
  assert history[3]["policy_updates"] == 8
  assert history[3]["active_prompts"] <= 4 and not set(history[3]["prompt_ids"]) & math_ids


def test_stage_dynamic_sampling_refills_or_skips(tmp_path):
  config = _config(tmp_path)
  config.rl.update(steps=1, group_size=2, dynamic_sampling=True,
                   dynamic_sampling_max_batches=2, eval_prompts=1)
  run_step_srpo(config)
  (h,) = json.loads((tmp_path / "rl" / "rl_curves.json").read_text())["history"]
  assert h["trained_groups"] <= 2 and h["sampled_groups"] in (2, 4)
  if h["trained_groups"] < 2:  # too few groups with signal: it sampled the second batch
    assert h["sampled_groups"] == 4
  assert h["policy_updates"] == (1 if h["trained_groups"] else 0)


@pytest.mark.parametrize("field, value, match", [
    ("stage1_mix", "easy:1,medium:1", "unknown kinds \\['medium'\\]"),
    ("stage2_mix", "science/easy:1", "no generated task is of kind \\['science/easy'\\]"),
    ("stage1_mix", "math", "is not 'kind:weight"),
    ("overlong_buffer", 16, "overlong_buffer must be in \\[0, max_new_tokens=16\\)"),
    ("updates_per_batch", 0, "updates_per_batch must be >= 1"),
])
def test_bad_rl_fields_are_config_errors(tmp_path, field, value, match):
  config = _config(tmp_path)
  config.rl[field] = value
  with pytest.raises(ConfigError, match=match):
    run_step_srpo(config)


def test_missing_sft_run_is_a_config_error(tmp_path):
  config = _config(tmp_path)
  config.rl.init_sft_workdir = str(tmp_path / "nope")
  with pytest.raises(ConfigError, match="no checkpoints under"):
    run_step_srpo(config)


def test_step_srpo_killed_after_a_checkpoint_resumes_with_identical_losses(tmp_path):
  from kat_jax.testing import assert_resume_reproduces  # pylint: disable=g-import-not-at-top

  def run(workdir):
    config = _config(tmp_path)
    config.workdir = workdir
    config.rl.update(steps=3, group_size=2, eval_prompts=1, stage1_mix="math:1",
                     stage2_mix="math:1")  # math only: verifiers without time limits
    config.train.update(checkpoint_every=2, log_every=1, async_checkpoint=False)
    run_step_srpo(config)

  assert_resume_reproduces(run, str(tmp_path), steps=3, kill_before=3, resumes_at=2)
