"""The agentic_rl stage end to end (tiny model): tree vs unrolled, pruning, the synchronous loop
reproduced exactly, rollouts one step ahead on a split mesh, kill and resume."""

import json
import os

import numpy as np
import pytest

from experiments.configs.agentic_rl import get_config
from kat_jax.agentic import batches as batches_lib
from kat_jax.agentic.environments import DigitsEnv
from kat_jax.agentic.batches import rl_batch
from kat_jax.agentic.config import objective_from
from kat_jax.agentic.stage import run_agentic_rl
from kat_jax.data.chat_template import tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.rl.trajectories import TrajectoryManager
from kat_jax.testing import assert_reproduces_synchronous_loop, relative_error


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


def test_one_step_stale_rollouts_with_pruning_log_prune_report_and_staleness(tmp_path):
  tokenizer = get_tokenizer("bytes")
  prompt = len(tokenize_chat(tokenizer, DigitsEnv().reset(0), template="qwen2.5",
                             add_generation_prompt=True).ids)
  # the prompt and one first-turn branch (3 tokens + the ~30-token observation) of each tree
  budget = prompt + 40
  config = _config(tmp_path / "stale", max_staleness=1, prune_budget=budget)
  config.train.steps = 2
  last = run_agentic_rl(config)
  history = _history(tmp_path, "stale")
  assert [h["step"] for h in history] == [1, 2] and last["step"] == 2
  for h in history:
    assert 0 <= h["staleness"] <= 1
    assert h["prune_kept_tokens"] == h["tree_tokens"] <= 2 * budget
    assert h["prune_kept_tokens"] < h["prune_total_tokens"]
    assert h["prune_total_trajectories"] == 8
    assert h["prune_kept_trajectories"] + h["prune_partial_trajectories"] <= 8
    assert 0 < h["weight_mass_kept"] < 1 and h["prune_partial_trajectories"] > 0
    assert np.isfinite(h["loss"])


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_on_policy_agentic_rl_reproduces_the_recorded_synchronous_loop(tmp_path):
  config = _config(tmp_path / "k0", max_staleness=0)
  config.train.update(steps=3, tensorboard=False, checkpoint_every=100)
  run_agentic_rl(config)
  record_path = os.path.join(os.path.dirname(__file__), "..", "rl", "data",
                             "synchronous_loop_record.json")
  with open(record_path, encoding="utf-8") as f:
    record = json.load(f)["agentic_rl"]
  got = _metrics(config.workdir)
  assert_reproduces_synchronous_loop(got, record)
  assert len(got) == 3
  assert all(row["staleness"] == 0 for row in got)
  for key in ("rollout_wait_s", "produce_s", "generate_s", "env_wait_s", "update_s",
              "weight_push_s"):
    assert all(row[key] >= 0 for row in got), key


def test_one_step_stale_agentic_rl_on_a_split_mesh_trains_on_recorded_behaviour_logprobs(
    tmp_path, monkeypatch):
  seen = []
  real_next = batches_lib.TreeRollouts.next

  def spy(self, state, step):
    work = real_next(self, state, step)
    seen.append((work.batch, self._last["episodes"]))
    return work

  monkeypatch.setattr(batches_lib.TreeRollouts, "next", spy)
  # unrolled: one row per episode, so each row's positions are its episode's tokens
  config = _config(tmp_path / "k1", max_staleness=1, rollout_devices=2, rollout_tensor=2,
                   pack="unrolled", temperature=0.7)
  config.train.update(steps=3, tensorboard=False)
  run_agentic_rl(config)
  rows = _metrics(config.workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert {row["staleness"] for row in rows} <= {0.0, 1.0}
  assert all("is_weight_mean" in row for row in rows)
  # Batch 0 is sampled with the weights its update starts from: π / π_behav = 1 per token,
  # also at a temperature != 1 (the behaviour log-probs are the tempered ones, as the loss's).
  assert abs(rows[0]["is_weight_mean"] - 1.0) < 1e-4
  assert len(seen) == 3
  for batch, groups in seen:
    assert "old_logp" not in batch  # the update computes the proximal log-probs itself
    behav, weights = np.asarray(batch["behav_logp"]), np.asarray(batch["kl_weight"])
    episodes = [e for group in groups for e in group]
    for row, episode in enumerate(episodes):
      trained = np.flatnonzero(episode.loss_mask)
      assert np.all(weights[row, trained] > 0)
      np.testing.assert_array_equal(behav[row, trained],
                                    np.float32(episode.logprobs)[trained])
    assert not np.any(weights[len(episodes):])  # padding rows train nothing


def test_one_step_stale_agentic_rl_killed_after_a_checkpoint_resumes_and_finishes(tmp_path):
  from kat_jax.testing import SimulatedKill, killed_before_step  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path / "killed", max_staleness=1)
  config.train.update(steps=3, checkpoint_every=2, async_checkpoint=False, tensorboard=False)
  with killed_before_step(3):
    with pytest.raises(SimulatedKill):
      run_agentic_rl(config)
  saved = [int(n) for n in os.listdir(tmp_path / "killed" / "checkpoints") if n.isdigit()]
  assert max(saved) == 2  # batch 3, produced ahead of the trainer, is lost with the kill
  last = run_agentic_rl(config)
  assert last["step"] == 3
  assert [row["step"] for row in _metrics(config.workdir)] == [1, 2, 3]
  assert [h["step"] for h in _history(tmp_path, "killed")] == [1, 2, 3]


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
    ("pack", "flat", "config.agentic.pack must be one of \\['tree', 'unrolled'\\], got 'flat'"),
    ("micro_batch_rows", 0, "config.agentic.micro_batch_rows must be >= 1"),
    ("max_staleness", -1, "config.agentic.max_staleness must be >= 0"),
    ("rollout_tensor", 0, "config.agentic.rollout_tensor must be >= 1"),
    ("rollout_devices", 9, "config.agentic.rollout_devices=9 .* do not fit the 8 devices"),
    ("is_cap", 0.5, "config.agentic: is_cap must be >= 1"),
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
