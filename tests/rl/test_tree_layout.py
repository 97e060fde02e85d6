"""The radix-trie PrefixTree and vectorised pack_trees equal a per-token trie, bit for bit.

The reference below is the plain token trie (one node per token, one Python update per
token) and a per-tree copy loop; the groups share heavily: one prompt, identical
trajectories, prefixes of others, divergence at the first and the last token, splits of
already split edges, shared tokens trained in one trajectory and not in another, masks
other than 0/1 and per-token advantages (with zeros of both signs).
"""

import numpy as np
import pytest

from kat_jax.rl.objectives import ObjectiveConfig, trajectory_weights
from kat_jax.rl.tree import TREE_KEYS, PrefixTree, Trajectory, build_trees, pack_trees

ATOL = 1e-4
FLOAT_KEYS = ("old_logp", "ref_logp", "adv_pos", "adv_neg", "kl_weight")


class _TokenNode:

  def __init__(self, token: int):
    self.token = token
    self.children: dict[int, _TokenNode] = {}
    self.old_logp = self.ref_logp = 0.0
    self.sampled = False
    self.adv_pos = self.adv_neg = self.kl_weight = 0.0
    self.visits = 0


def _reference_add(roots: dict, trajectory: Trajectory, weight: float) -> None:
  """One trajectory into a token trie, token by token, in Python floats."""
  children = roots
  for i, token in enumerate(trajectory.tokens.tolist()):
    node = children.get(token)
    trained = bool(trajectory.loss_mask[i])
    if node is None:
      node = children[token] = _TokenNode(token)
    if node.visits == 0 or (trained and not node.sampled):
      node.old_logp = float(trajectory.old_logp[i])
      node.ref_logp = float(trajectory.ref_logp[i])
      node.sampled = trained
    elif trained and abs(node.old_logp - trajectory.old_logp[i]) > ATOL:
      raise ValueError(f"token {i} of a trajectory shares its context with another "
                       f"trajectory but has old_logp {trajectory.old_logp[i]} vs "
                       f"{node.old_logp}: the same context must have one log-prob")
    node.visits += 1
    if trained:
      w = weight * float(trajectory.loss_mask[i])
      a = float(trajectory.advantage[i])
      node.adv_pos += w * max(a, 0.0)
      node.adv_neg += w * min(a, 0.0)
      node.kl_weight += w
    children = node.children


def _reference_layout(roots: dict) -> dict[str, np.ndarray]:
  """Pre-order over tokens, children in insertion order; kv_end by recursion."""
  rows = []  # (node, depth, parent index, kv_end)

  def visit(node, depth, parent):
    index = len(rows)
    rows.append([node, depth, parent, -1])
    for child in node.children.values():
      visit(child, depth + 1, index)
    rows[index][3] = len(rows)

  for node in roots.values():
    visit(node, 0, -1)
  out = {
      "tokens": np.array([r[0].token for r in rows], np.int32),
      "positions": np.array([r[1] for r in rows], np.int32),
      "kv_end": np.array([r[3] for r in rows], np.int32),
      "pred_index": np.array([r[2] if r[2] >= 0 else i for i, r in enumerate(rows)],
                             np.int32),
      "visits": np.array([r[0].visits for r in rows], np.int32),
  }
  for key in FLOAT_KEYS:
    out[key] = np.array([getattr(r[0], key) for r in rows], np.float32)
  return out


def _reference_pack(layouts, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """First fit, largest tree first (ties in order); each tree copied key by key into its row."""
  rows, used = [], []
  for layout in sorted(layouts, key=lambda layout: -len(layout["tokens"])):
    size = len(layout["tokens"])
    for r, u in enumerate(used):
      if u + size <= seq_len:
        rows[r].append(layout)
        used[r] += size
        break
    else:
      rows.append([layout])
      used.append(size)
  batch = {k: np.zeros((len(rows), seq_len), np.float32 if k in FLOAT_KEYS else np.int32)
           for k in TREE_KEYS}
  batch["tokens"][:] = pad_id
  for r, row in enumerate(rows):
    offset = 0
    for seg, layout in enumerate(row, start=1):
      n = len(layout["tokens"])
      for key in TREE_KEYS:
        value = seg if key == "segment_ids" else layout[key]
        if key in ("kv_end", "pred_index"):
          value = value + offset
        batch[key][r, offset:offset + n] = value
      offset += n
    batch["kv_end"][r, offset:] = np.arange(offset, seq_len) + 1
    batch["pred_index"][r, offset:] = np.arange(offset, seq_len)
  return batch


def _assert_bit_identical(have: dict, want: dict) -> None:
  assert sorted(have) == sorted(want)
  for key in want:
    assert have[key].dtype == want[key].dtype, key
    assert have[key].shape == want[key].shape, key
    # As raw bytes: float values must match to the bit (the sign of a zero included).
    np.testing.assert_array_equal(have[key].view(np.uint8), want[key].view(np.uint8),
                                  err_msg=key)


def _context_logp(tokens, i: int, salt: int) -> float:
  """A log-prob that depends only on the context tokens[:i + 1]."""
  return -0.05 - (hash((salt,) + tuple(tokens[:i + 1])) % 4999) / 1000.0


def _trajectory(rng, tokens: list[int]) -> Trajectory:
  """Random mask (0, 1 or 0.5) and per-token advantages; consistent log-probs where trained
  (jittered within the tolerance), arbitrary placeholders (and advantages) where not."""
  n = len(tokens)
  mask = rng.choice([0.0, 1.0, 1.0, 0.5], n)
  trained = mask != 0
  old = np.array([_context_logp(tokens, i, 1) for i in range(n)]) + rng.uniform(
      -ATOL / 3, ATOL / 3, n)
  ref = np.array([_context_logp(tokens, i, 2) for i in range(n)])
  old[~trained] = rng.normal(size=int((~trained).sum()))
  ref[~trained] = rng.normal(size=int((~trained).sum()))
  advantage = rng.choice([rng.normal(), -rng.normal(), 0.0, -0.0], n)
  # Where a token is not trained its advantage is never read, even when not finite.
  advantage[~trained] = rng.choice([0.0, np.inf, np.nan], int((~trained).sum()))
  return Trajectory(tokens, mask, advantage, old, ref)


def _random_group(rng, vocab: int = 3) -> list[Trajectory]:
  """Trajectories of one prompt, each made from an earlier one (copy, prefix, branch at
  any token including the first and the last) or fresh."""
  prompt = rng.integers(0, vocab, rng.integers(0, 4)).tolist()
  responses: list[list[int]] = []
  for _ in range(rng.integers(1, 9)):
    kind = rng.integers(5) if responses else 4
    base = responses[rng.integers(len(responses))] if responses else []
    fresh = rng.integers(0, vocab, rng.integers(1, 12)).tolist()
    if kind == 0:  # identical to an earlier one
      response = list(base)
    elif kind == 1:  # a prefix of an earlier one (may end inside an edge)
      response = base[:rng.integers(0, len(base) + 1)]
    elif kind == 2:  # branches off an earlier one anywhere
      response = base[:rng.integers(0, len(base) + 1)] + fresh
    elif kind == 3:  # branches off at the first or the last token
      response = base[:rng.choice([0, max(len(base) - 1, 0)])] + fresh
    else:
      response = fresh
    responses.append(response)
  return [_trajectory(rng, prompt + r) for r in responses]


def _reference_trees(groups, cfg):
  flat = [t for group in groups for t in group]
  weights = iter(trajectory_weights(np.array([t.loss_mask.sum() for t in flat]), cfg))
  trees = []
  for group in groups:
    roots: dict = {}
    for trajectory in group:
      _reference_add(roots, trajectory, float(next(weights)))
    trees.append(_reference_layout(roots))
  return trees


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_radix_tree_layouts_and_packed_rows_equal_the_token_trie_bit_for_bit(loss_agg_mode):
  rng = np.random.default_rng(0)
  cfg = ObjectiveConfig(loss_agg_mode=loss_agg_mode)
  for _ in range(40):
    groups = [_random_group(rng, vocab=int(rng.integers(2, 6))) for _ in range(6)]
    want = _reference_trees(groups, cfg)
    trees = build_trees(groups, cfg)
    for tree, layout, group in zip(trees, want, groups):
      _assert_bit_identical(tree.layout(), layout)
      assert tree.num_nodes == len(layout["tokens"])
      assert tree.unrolled_tokens == sum(len(t.tokens) for t in group)
    seq_len = max(len(layout["tokens"]) for layout in want) + int(rng.integers(0, 8))
    _assert_bit_identical(pack_trees(trees, seq_len, 7), _reference_pack(want, seq_len, 7))


def test_splitting_an_already_split_edge_keeps_the_token_trie_layout():
  rng = np.random.default_rng(1)
  base = list(range(10, 22))
  group = [_trajectory(rng, t) for t in (
      base,  # one edge of 12 tokens
      base[:6] + [1, 2],  # split after 6
      base[:3] + [3],  # split the upper part again
      base[:8] + [4],  # split the lower part
      base[:5],  # a prefix ending inside an edge: a split without a new branch
      base[:8] + [4],  # identical to an earlier one
      [base[0]] + [5],  # diverges after the first token
      base[:11] + [6],  # diverges at the last token
      [7] + base)]  # diverges at the first token: a second root
  cfg = ObjectiveConfig()
  (want,) = _reference_trees([group], cfg)
  (tree,) = build_trees([group], cfg)
  _assert_bit_identical(tree.layout(), want)
  assert tree.num_nodes == len(want["tokens"]) == 12 + 2 + 1 + 1 + 1 + 1 + 13


def test_pack_trees_of_empty_and_no_trees_equal_the_copy_loop():
  rng = np.random.default_rng(2)
  cfg = ObjectiveConfig()
  groups = [[], [_trajectory(rng, [1, 2, 3])], [_trajectory(rng, [])], [_trajectory(rng, [4])]]
  want = _reference_trees(groups, cfg)
  _assert_bit_identical(pack_trees(build_trees(groups, cfg), 3, 0), _reference_pack(want, 3, 0))
  _assert_bit_identical(pack_trees([], 5, 0), _reference_pack([], 5, 0))


def _clash_cases():
  """(earlier trajectories, the clashing one): a trained token of the last one has another
  old_logp than an earlier trajectory that trained the same context."""
  long = Trajectory([1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1], 1.0, [0, -1, -2, -3, -4, -5])
  return [
      ([long], Trajectory([1, 2, 3, 4], [0, 1, 1, 1], 1.0, [0, -1, -2, -3.5])),  # in an edge
      ([long], Trajectory([1, 2, 3, 9], [0, 0, 1, 1], 1.0, [0, 0, -2.01, -1])),  # edge left
      # token 2 was first visited untrained, then trained with -2: -7 now clashes.
      ([Trajectory([1, 2], [0, 0], 1.0, [0, -9]), Trajectory([1, 2], [0, 1], 1.0, [0, -2])],
       Trajectory([1, 2, 8], [0, 1, 1], 1.0, [0, -7, -1])),
  ]


@pytest.mark.parametrize("case", range(3))
def test_old_logp_clash_raises_the_token_trie_error_and_leaves_the_tree_unchanged(case):
  earlier, clashing = _clash_cases()[case]
  roots: dict = {}
  tree = PrefixTree()
  for trajectory in earlier:
    _reference_add(roots, trajectory, 1.0)
    tree.add(trajectory, 1.0)
  before = tree.layout()
  with pytest.raises(ValueError) as want:
    _reference_add(roots, clashing, 1.0)
  with pytest.raises(ValueError, match="must have one log-prob") as have:
    tree.add(clashing, 1.0)
  assert str(have.value) == str(want.value)
  _assert_bit_identical(tree.layout(), before)
  assert tree.unrolled_tokens == sum(len(t.tokens) for t in earlier)


def test_trained_then_untrained_placeholder_and_first_trained_visit_do_not_clash():
  roots: dict = {}
  tree = PrefixTree()
  for trajectory in (Trajectory([1, 2], [0, 0], 1.0, [0, -9]),  # placeholder, not trained
                     Trajectory([1, 2, 3], [0, 1, 1], 1.0, [0, -2, -1]),  # first trained: -2
                     Trajectory([1, 2], [0, 0], -1.0, [0, 5])):  # placeholder ignored
    _reference_add(roots, trajectory, 0.5)
    tree.add(trajectory, 0.5)
  layout = tree.layout()
  _assert_bit_identical(layout, _reference_layout(roots))
  assert layout["old_logp"].tolist() == [0, -2, -1] and layout["visits"].tolist() == [3, 3, 1]


def test_pack_trees_rejects_a_tree_longer_than_seq_len():
  rng = np.random.default_rng(3)
  trees = build_trees([[_trajectory(rng, [1, 2])], [_trajectory(rng, [1, 2, 3, 4])]],
                      ObjectiveConfig())
  with pytest.raises(ValueError, match="a tree of 4 tokens does not fit seq_len 3"):
    pack_trees(trees, 3, 0)


def test_pack_trees_places_the_largest_tree_first_and_so_fills_fewer_rows():
  # Trees of 4, 7, 3 and 6 tokens in rows of 10: in arrival order first fit needs 3 rows
  # ([4, 3], [7], [6]); largest first needs 2 ([7, 3], [6, 4]).
  groups = [[Trajectory(list(range(1, n + 1)), [0] + [1] * (n - 1), 1.0)] for n in (4, 7, 3, 6)]
  batch = pack_trees(build_trees(groups, ObjectiveConfig()), 10, 0)
  assert batch["tokens"].shape == (2, 10)
  np.testing.assert_array_equal(batch["segment_ids"], [[1] * 7 + [2] * 3, [1] * 6 + [2] * 4])
