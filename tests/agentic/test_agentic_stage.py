"""The agentic_rl stage end to end (tiny model): tree vs unrolled, pruning, decoupled mode."""

import json

import numpy as np
import pytest

from experiments.configs.agentic_rl import get_config
from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.batches import rl_batch
from kat_jax.agentic.config import objective_from
from kat_jax.agentic.stage import run_agentic_rl
from kat_jax.data.chat_template import tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.testing import relative_error


def _config(workdir, **agentic):
  config = get_config()
  config.workdir = str(workdir)
  config.model.num_layers = 1
  config.train.steps = 1
  config.train.log_every = 1
  config.agentic.tasks_per_step = 2
  config.agentic.branching = "2,2"
  config.agentic.max_new_tokens = 3
  config.agentic.seq_len = 640
  for key, value in agentic.items():
    config.agentic[key] = value
  return config


def _history(tmp_path, name: str) -> list[dict]:
  return json.loads((tmp_path / name / "agentic_metrics.json").read_text())["history"]


def test_tree_and_unrolled_packing_take_the_same_single_update(tmp_path):
  # Same seed -> the same rollouts; one optimizer update over all rows in both layouts.
  # On the first update the policy is the behaviour policy (ratio 1) and advantages are
  # group-normalised, so the policy-gradient loss is 0 up to rounding (~1e-8) and cannot tell
  # two weightings apart; an entropy bonus makes the loss a weighted sum over every token.
  tree = run_agentic_rl(_config(tmp_path / "tree", pack="tree", entropy_coef=0.01))
  flat = run_agentic_rl(_config(tmp_path / "flat", pack="unrolled", entropy_coef=0.01))
  for name, record in (("tree", tree), ("flat", flat)):
    assert _history(tmp_path, name) == [pytest.approx(record)]
    assert record["step"] == 1 and record["episodes"] == 8  # 2 tasks x 2 x 2 branches
  assert tree["reward_mean"] == flat["reward_mean"]
  assert tree["tree_tokens"] < tree["unrolled_tokens"] == flat["unrolled_tokens"]
  assert tree["micro_batches"] == 1 and flat["micro_batches"] == 4  # 8 rows, 2 per chunk
  assert abs(flat["loss"]) > 1e-3  # the entropy term, well above rounding
  assert relative_error(tree["loss"], flat["loss"]) < 1e-4
  assert relative_error(tree["grad_norm"], flat["grad_norm"]) < 1e-4
  assert tree["grad_norm"] > 0


def test_decoupled_mode_with_pruning_logs_prune_report_and_staleness(tmp_path):
  tokenizer = get_tokenizer("bytes")
  prompt = len(tokenize_chat(tokenizer, DigitsEnv().reset(0), template="qwen2.5",
                             add_generation_prompt=True).ids)
  # the prompt and one first-turn branch (3 tokens + the ~30-token observation) of each tree
  budget = prompt + 40
  config = _config(tmp_path / "decoupled", mode="decoupled", rollout_workers=2,
                   max_staleness=1, prune_budget=budget, decoupled_timeout_s=600.0)
  config.train.steps = 2
  last = run_agentic_rl(config)
  history = _history(tmp_path, "decoupled")
  assert [h["step"] for h in history] == [1, 2] and last["step"] == 2
  for h in history:
    assert 0 <= h["staleness"] <= 1
    assert h["prune_kept_tokens"] == h["tree_tokens"] <= 2 * budget
    assert h["prune_kept_tokens"] < h["prune_total_tokens"]
    assert h["prune_total_trajectories"] == 8
    assert h["prune_kept_trajectories"] + h["prune_partial_trajectories"] <= 8
    assert 0 < h["weight_mass_kept"] < 1 and h["prune_partial_trajectories"] > 0
    assert np.isfinite(h["loss"])


def _recorded_group(prompt, completions) -> list:
  """One group of single-turn trajectories: log-prob -0.5 and entropy 1 per sampled token."""
  manager = TrajectoryManager()
  for completion in completions:
    n = len(completion)
    manager.set_reward(manager.record(0, prompt, completion, [-0.5] * n, entropies=[1.0] * n),
                       0.0)
  return manager.trajectories(0)


def test_rl_batch_prune_stats_and_a_budget_below_the_prompt():
  ag = _config("unused", prune_budget=6, seq_len=16).agentic
  groups = [_recorded_group([1, 2], [[3, 4, 5], [3, 6], [7]])]
  batch, stats = rl_batch(groups, np.array([1.0, -1.0, 0.5]), ag, objective_from(ag), 0)
  assert batch["tokens"].shape == (2, 16)  # one tree row, padded to micro_batch_rows
  assert stats["prune_total_tokens"] == 7 and stats["prune_kept_tokens"] == stats[
      "tree_tokens"] <= 6
  assert stats["prune_total_trajectories"] == 3
  assert stats["prune_kept_trajectories"] + stats["prune_partial_trajectories"] == 3
  ag.prune_budget = 2  # the prompt only: a warning, the update would be empty
  with pytest.warns(UserWarning, match="prune_budget 2 keeps no policy token of 1 of 1"):
    rl_batch(groups, np.array([1.0, -1.0, 0.5]), ag, objective_from(ag), 0)
  ag.prune_budget = 1
  with pytest.raises(ConfigError, match="config.agentic.prune_budget.*root segment"):
    rl_batch(groups, np.array([1.0, -1.0, 0.5]), ag, objective_from(ag), 0)


@pytest.mark.parametrize("field, value, message", [
    ("mode", "async", "config.agentic.mode 'async' not in"),
    ("pack", "flat", "config.agentic.pack 'flat' not in"),
    ("micro_batch_rows", 0, "config.agentic.micro_batch_rows must be >= 1"),
])
def test_bad_agentic_fields_are_config_errors(tmp_path, field, value, message):
  with pytest.raises(ConfigError, match=message):
    run_agentic_rl(_config(tmp_path, **{field: value}))


def test_agentic_rl_killed_after_a_checkpoint_resumes_with_identical_losses(tmp_path):
  from kat_jax.testing import assert_resume_reproduces  # pylint: disable=g-import-not-at-top

  def run(workdir):
    config = _config(workdir)
    config.train.update(steps=3, checkpoint_every=2, async_checkpoint=False)
    run_agentic_rl(config)

  assert_resume_reproduces(run, str(tmp_path), steps=3, kill_before=3, resumes_at=2)
