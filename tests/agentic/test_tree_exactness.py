"""The packed prefix-tree loss (and gradient) equals the unrolled loss, for every mode.

Random forests with per-token (Step-SRPO segment) advantages and tokens prefilled in one
trajectory but sampled in another."""

import jax
import numpy as np
import pytest

from kat_jax.rl.tree import (PrefixTree, Trajectory, build_trees, pack_trees,
                                  unrolled_batch)
from kat_jax.data.packing import validate_batch
from kat_jax.kernels.reference import visibility_mask
from kat_jax.model import get_preset, init_params
from kat_jax.rl.objectives import LOSS_AGG_MODES, ObjectiveConfig
from kat_jax.rl.policy_step import make_policy_loss_fn
from kat_jax.testing import assert_trees_close, relative_error


def _context_value(prefix: tuple, salt: int) -> float:
  """A log-prob that depends only on the context (as a real behaviour policy's does)."""
  return -0.1 - (hash((salt,) + prefix) % 997) / 400.0


def _segment_advantages(rng, prompt_len: int, response_len: int) -> np.ndarray:
  """Step-SRPO-like per-token advantages: 0 on the prompt, 1-3 constant response segments."""
  cuts = np.sort(rng.integers(0, response_len + 1, rng.integers(0, 3)))
  values = rng.normal(size=len(cuts) + 1)
  segment = np.searchsorted(cuts, np.arange(response_len), side="right")
  return np.concatenate([np.zeros(prompt_len), values[segment]])


def _random_group(rng, vocab=60, group_size=4):
  """Trajectories of one prompt whose responses branch off each other at random points.

  Advantages are per token (segments, as Step-SRPO gives). The first response token is
  prefilled (mask 0, placeholder log-prob 0, like a forced Step-SRPO mode tag) in the first
  trajectory and at random in others, so a shared token is often prefilled in one
  trajectory and sampled in another.
  """
  prompt = list(rng.integers(0, vocab, rng.integers(2, 5)))
  responses = []
  for _ in range(group_size):
    if responses and rng.random() < 0.8:
      base = responses[rng.integers(len(responses))]
      cut = int(rng.integers(0, len(base) + 1))
      response = base[:cut] + list(rng.integers(0, vocab, rng.integers(1, 5)))
    else:
      response = list(rng.integers(0, vocab, rng.integers(2, 7)))
    responses.append(response)
  group = []
  for k, response in enumerate(responses):
    tokens = prompt + response
    mask = [0] * len(prompt) + [1] * len(response)
    old = [_context_value(tuple(tokens[:i + 1]), 1) for i in range(len(tokens))]
    ref = [_context_value(tuple(tokens[:i + 1]), 2) for i in range(len(tokens))]
    if k == 0 or rng.random() < 0.3:
      mask[len(prompt)] = old[len(prompt)] = ref[len(prompt)] = 0
    group.append(Trajectory(tokens, mask, _segment_advantages(rng, len(prompt), len(response)),
                            old, ref))
  return group


def _mixed_tokens(group) -> int:
  """How many shared contexts are trained in one trajectory and not in another."""
  seen: dict[tuple, set] = {}
  for t in group:
    for i in range(len(t.tokens)):
      seen.setdefault(tuple(t.tokens[:i + 1].tolist()), set()).add(float(t.loss_mask[i]))
  return sum(len(flags) > 1 for flags in seen.values())


def test_layout_by_hand():
  # prompt [1, 2]; responses [3, 4] and [3, 5] and [6]
  tree = PrefixTree()
  for response, adv in (([3, 4], 1.0), ([3, 5], -2.0), ([6], 0.5)):
    tree.add(Trajectory([1, 2] + response, [0, 0] + [1] * len(response), adv), weight=0.5)
  out = tree.layout()
  np.testing.assert_array_equal(out["tokens"], [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(out["positions"], [0, 1, 2, 3, 3, 2])
  np.testing.assert_array_equal(out["kv_end"], [6, 6, 5, 4, 5, 6])
  np.testing.assert_array_equal(out["pred_index"], [0, 0, 1, 2, 2, 1])
  np.testing.assert_array_equal(out["visits"], [3, 3, 2, 1, 1, 1])
  np.testing.assert_allclose(out["adv_pos"], [0, 0, 0.5, 0.5, 0, 0.25])
  np.testing.assert_allclose(out["adv_neg"], [0, 0, -1.0, 0, -1.0, 0])
  np.testing.assert_allclose(out["kl_weight"], [0, 0, 1.0, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_a_token_prefilled_in_one_trajectory_and_sampled_in_another(order):
  # [1, 2, 3]: token 2 prefilled (mask 0, placeholder log-prob 0); [1, 2, 4]: token 2 sampled
  trajs = [Trajectory([1, 2, 3], [0, 0, 1], 1.0, [0, 0, -0.5]),
           Trajectory([1, 2, 4], [0, 1, 1], -1.0, [0, -1.5, -0.7])]
  tree = PrefixTree()
  for k in order:
    tree.add(trajs[k], weight=0.5)
  out = tree.layout()
  assert out["tokens"][1] == 2 and out["visits"][1] == 2
  assert out["old_logp"][1] == -1.5  # the sampled trajectory's log-prob, in either order
  assert out["kl_weight"][1] == 0.5 and out["adv_neg"][1] == -0.5 and out["adv_pos"][1] == 0


def test_inconsistent_old_logp_is_an_error():
  tree = PrefixTree()
  tree.add(Trajectory([1, 2], [0, 1], 1.0, [0, -1.0]), 1.0)
  with pytest.raises(ValueError, match="must have one log-prob"):
    tree.add(Trajectory([1, 2, 3], [0, 1, 1], 1.0, [0, -2.0, -1.0]), 1.0)


def _ancestor_visibility(batch: dict, groups) -> np.ndarray:
  """[B, T, T] bool: token i sees token j iff j's token path is a prefix of i's, in one tree.

  Built without kv_end: each token's path (its tokens from the root) follows pred_index, and
  the paths of every tree are first checked to be exactly the distinct prefixes of its
  group's trajectories, so pred_index itself is checked against the trajectories.
  """
  rows, length = batch["tokens"].shape
  expected = np.zeros((rows, length, length), bool)
  trees = []
  for r in range(rows):
    paths = {}
    for i in range(length):
      if batch["segment_ids"][r, i] == 0:  # padding
        expected[r, i, i] = True
        continue
      parent = batch["pred_index"][r, i]
      paths[i] = (paths[parent] if parent != i else ()) + (int(batch["tokens"][r, i]),)
    for i, path_i in paths.items():
      for j, path_j in paths.items():
        same_tree = batch["segment_ids"][r, i] == batch["segment_ids"][r, j]
        expected[r, i, j] = same_tree and path_i[:len(path_j)] == path_j
    for seg in set(batch["segment_ids"][r]) - {0}:
      tree_paths = [p for i, p in paths.items() if batch["segment_ids"][r, i] == seg]
      assert len(set(tree_paths)) == len(tree_paths)  # each prefix laid out once
      trees.append(sorted(tree_paths))
  prefixes = [sorted({tuple(int(x) for x in t.tokens[:n]) for t in group
                      for n in range(1, len(t.tokens) + 1)}) for group in groups]
  assert sorted(trees) == sorted(prefixes)
  return expected


@pytest.fixture(scope="module")
def model():
  config = get_preset("tiny", num_layers=2)
  return config, init_params(config, jax.random.key(0))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_tree_packed_loss_and_gradient_equal_unrolled(model, mode):
  config, params = model
  rng = np.random.default_rng(LOSS_AGG_MODES.index(mode))
  groups = [_random_group(rng) for _ in range(3)]
  assert sum(_mixed_tokens(g) for g in groups) > 0  # the prefilled/sampled case is exercised
  assert any(len(np.unique(t.advantage[t.loss_mask > 0])) > 1 for g in groups for t in g)
  cfg = ObjectiveConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, beta=0.05,
                        entropy_coef=0.01, loss_agg_mode=mode, max_response_length=16)
  tree_batch = pack_trees(build_trees(groups, cfg), seq_len=40, pad_id=0)
  flat_batch = unrolled_batch(groups, cfg, seq_len=20, pad_id=0)
  validate_batch({**tree_batch, "weights": tree_batch["kl_weight"]})
  assert tree_batch["tokens"].size < flat_batch["tokens"].size
  # every token sees exactly its ancestors (and itself), pads only themselves
  np.testing.assert_array_equal(np.asarray(visibility_mask(tree_batch["kv_end"])),
                                _ancestor_visibility(tree_batch, groups))

  loss_fn = jax.jit(jax.value_and_grad(make_policy_loss_fn(config, cfg, loss_chunk=16),
                                       has_aux=True))
  (tree_loss, tree_metrics), tree_grads = loss_fn(params, tree_batch)
  (flat_loss, flat_metrics), flat_grads = loss_fn(params, flat_batch)
  assert relative_error(tree_loss, flat_loss) < 1e-5
  assert relative_error(tree_metrics["kl"], flat_metrics["kl"]) < 1e-5
  assert relative_error(tree_metrics["entropy"], flat_metrics["entropy"]) < 1e-5
  assert_trees_close(tree_grads, flat_grads, rtol=1e-5)
