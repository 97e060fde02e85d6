"""Entropy pruning: budget respected, best-first order, exact restriction of the tree loss."""

import jax
import numpy as np
import pytest

from kat_jax.agentic.pruning import (build_pruned_trees, compressed_trie, prune_group,
                                     truncate)
from kat_jax.rl.tree import Trajectory, build_trees, pack_trees, unrolled_batch
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import ObjectiveConfig
from kat_jax.rl.policy_step import make_policy_loss_fn
from kat_jax.testing import assert_trees_close, relative_error


def _group():
  # prompt [1, 2]; branch A = [3, 4, 5] (twice: [3,4,5,6] and [3,4,5,7]), branch B = [8, 9]
  responses = [[3, 4, 5, 6], [3, 4, 5, 7], [8, 9]]
  trajs, ents = [], []
  for k, r in enumerate(responses):
    tokens = [1, 2] + r
    mask = [0, 0] + [1] * len(r)
    old = [0.0, 0.0] + [-0.5 - 0.1 * t for t in r]
    trajs.append(Trajectory(tokens, mask, [1.0, -1.0, 0.5][k], old))
    ent = [0.0, 0.0] + [{3: 0.2, 4: 0.2, 5: 0.2, 6: 2.0, 7: 0.1, 8: 1.0, 9: 1.0}[t] for t in r]
    ents.append(np.array(ent))
  return trajs, ents


def test_compressed_trie_segments():
  trajs, ents = _group()
  segs = compressed_trie(trajs, ents)
  spans = sorted((s.start, s.end, tuple(s.members)) for s in segs)
  assert spans == [(0, 2, (0, 1, 2)), (2, 4, (2,)), (2, 5, (0, 1)), (5, 6, (0,)),
                   (5, 6, (1,))]
  assert sum(s.num_tokens for s in segs) == build_trees([trajs], ObjectiveConfig())[0].num_nodes


def test_random_compressed_tries_have_maximal_shared_runs_and_the_prefix_trees_size():
  rng = np.random.default_rng(1)
  for _ in range(200):
    base = list(rng.integers(0, 3, rng.integers(1, 4)))
    # Few symbols and short tails: long shared runs, and trajectories that are prefixes of others.
    trajs = [Trajectory(tokens, [0] * len(base) + [1] * (len(tokens) - len(base)), 1.0)
             for tokens in (base + list(rng.integers(0, 2, rng.integers(0, 6)))
                            for _ in range(5))]
    segs = compressed_trie(trajs, [np.zeros(len(t.tokens)) for t in trajs])
    for seg in segs:
      runs = [np.asarray(trajs[k].tokens[seg.start:seg.end]) for k in seg.members]
      assert all(len(r) == seg.end - seg.start and (r == runs[0]).all() for r in runs)
      at_end = [trajs[k].tokens[seg.end] for k in seg.members if seg.end < len(trajs[k].tokens)]
      assert len(at_end) < len(seg.members) or len(set(at_end)) > 1, "run not maximal"
    assert sum(s.num_tokens for s in segs) == build_trees([trajs], ObjectiveConfig())[0].num_nodes


def test_shared_segment_takes_values_from_a_member_that_trains_the_token():
  # token 2 is prefilled in the first trajectory (mask 0, entropy 0), sampled in the second
  trajs = [Trajectory([1, 2, 3], [0, 0, 1], 1.0, [0, 0, -0.5]),
           Trajectory([1, 2, 4], [0, 1, 1], -1.0, [0, -1.5, -0.7])]
  root = compressed_trie(trajs, [np.array([0, 0, 0.3]), np.array([0, 1.5, 0.9])])[0]
  assert (root.start, root.end) == (0, 2)
  np.testing.assert_array_equal(root.loss_mask, [0, 1])
  np.testing.assert_array_equal(root.entropy, [0, 1.5])
  np.testing.assert_array_equal(root.old_logp, [0, -1.5])


def test_budget_keeps_best_branches_first():
  trajs, ents = _group()
  # Scores: [3,4,5] = 2/3*0.2 = 0.13, [8,9] = 1/3*1.0 = 0.33, [6] = 1/3*2 = 0.67, [7] = 0.03.
  full = prune_group(trajs, ents, budget=100)
  assert full.report.kept_tokens == full.report.total_tokens == 9
  assert full.report.kept_trajectories == 3 and full.report.weight_mass_kept == 1.0
  four = prune_group(trajs, ents, budget=4)  # prompt + [8,9] (best first), [3,4,5] no room
  np.testing.assert_array_equal(four.keep_lengths, [2, 2, 4])
  assert four.report.kept_tokens == 4 and four.report.kept_trajectories == 1
  assert four.report.partial_trajectories == 2
  # seq-mean-token-mean: each trajectory has weight 1/3 spread over its tokens
  assert four.report.weight_mass_kept == pytest.approx(1 / 3)
  seven = prune_group(trajs, ents, budget=7)  # then [3,4,5]; no room for a leaf
  np.testing.assert_array_equal(seven.keep_lengths, [5, 5, 4])
  eight = prune_group(trajs, ents, budget=8)  # the high-entropy leaf [6] before [7]
  np.testing.assert_array_equal(eight.keep_lengths, [6, 5, 4])
  assert eight.report.kept_trajectories == 2 and eight.report.kept_tokens == 8
  assert eight.report.weight_mass_kept == pytest.approx((1 + 3 / 4 + 1) / 3)
  # a pluggable score: prefer the longest-visited branch regardless of entropy
  visits = prune_group(trajs, ents, budget=5, score_fn=lambda s: s.visits)
  np.testing.assert_array_equal(visits.keep_lengths, [5, 5, 2])
  logp = prune_group(trajs, ents, budget=5, score_fn="logp_reach")
  assert logp.report.kept_tokens <= 5
  with pytest.raises(ValueError, match="unknown score_fn"):
    prune_group(trajs, ents, budget=5, score_fn="nope")
  with pytest.raises(ValueError, match="budget"):
    prune_group(trajs, ents, budget=0)


def test_budget_below_the_prompt_is_an_error_not_an_empty_tree():
  trajs, ents = _group()  # the shared prompt [1, 2] is the root segment
  with pytest.raises(ValueError, match="budget 1 is smaller than the group's root segment "
                     r"\(2 tokens"):
    prune_group(trajs, ents, budget=1)
  two = prune_group(trajs, ents, budget=2)  # the prompt alone fits: kept, no policy token
  assert two.report.kept_tokens == 2 and two.report.weight_mass_kept == 0.0


def test_random_groups_respect_budget_and_stay_ancestor_closed():
  rng = np.random.default_rng(0)
  for _ in range(300):
    base = list(rng.integers(0, 9, 3))
    trajs, ents = [], []
    for _ in range(5):
      tokens = base + list(rng.integers(0, 3, rng.integers(1, 6)))
      trajs.append(Trajectory(tokens, [0] * 3 + [1] * (len(tokens) - 3), 1.0))
      ents.append(rng.random(len(tokens)))
    budget = int(rng.integers(3, 20))
    pruned = prune_group(trajs, ents, budget)
    tree = build_pruned_trees([pruned], ObjectiveConfig())[0]
    kept = {tuple(t.tokens[:i]) for t, n in zip(trajs, pruned.keep_lengths)
            for i in range(1, n + 1)}  # tree nodes as token paths from the root
    # A shared node is kept for every trajectory through it (else its loss weight changes).
    for t, n in zip(trajs, pruned.keep_lengths):
      assert [tuple(t.tokens[:i]) in kept for i in range(1, len(t.tokens) + 1)] == [
          i <= n for i in range(1, len(t.tokens) + 1)]
    assert _tree_paths(tree) == kept
    # Ancestor-closed: kept prefixes include their ancestors by construction, so a pruner
    # that kept a branch without its parent shows as parent tokens it never counted.
    assert len(kept) == pruned.report.kept_tokens <= budget


def _tree_paths(tree) -> set[tuple]:
  """Token paths from the root of every token of a PrefixTree (from its layout)."""
  layout = tree.layout()
  paths = []  # depth-first: a token's predecessor comes before it
  for j, (token, pred) in enumerate(zip(layout["tokens"].tolist(),
                                        layout["pred_index"].tolist())):
    paths.append((paths[pred] if pred != j else ()) + (token,))
  return set(paths)


@pytest.fixture(scope="module")
def model():
  config = get_preset("tiny", num_layers=1)
  return config, init_params(config, jax.random.key(0))


def test_pruned_tree_loss_equals_unrolled_loss_restricted_to_kept_tokens(model):
  config, params = model
  trajs, ents = _group()
  cfg = ObjectiveConfig(beta=0.1, loss_agg_mode="seq-mean-token-mean")
  pruned = prune_group(trajs, ents, budget=7, cfg=cfg)
  tree_batch = pack_trees(build_pruned_trees([pruned], cfg), seq_len=16, pad_id=0)
  flat = unrolled_batch([trajs], cfg, seq_len=8, pad_id=0)
  for r, n in enumerate(pruned.keep_lengths):  # zero the loss weights of dropped tokens
    for key in ("adv_pos", "adv_neg", "kl_weight"):
      flat[key][r, n:] = 0.0
  loss_fn = jax.jit(jax.value_and_grad(make_policy_loss_fn(config, cfg, loss_chunk=16),
                                       has_aux=True))
  (tree_loss, _), tree_grads = loss_fn(params, tree_batch)
  (flat_loss, _), flat_grads = loss_fn(params, flat)
  assert relative_error(tree_loss, flat_loss) < 1e-5
  assert_trees_close(tree_grads, flat_grads, rtol=1e-5)
  assert len(truncate(trajs[0], 3).tokens) == 3
