"""A radix (compressed) trie of token sequences, shared by `tree.py` and `trajectories.py`.

A node holds the edge from its parent as one token array, so walking a sequence compares
whole segments with numpy instead of looking up one dict entry per token. Subclasses attach
their own per-token arrays (named in `PER_TOKEN`); `split` cuts them with the edge.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class RadixNode:
  """The edge `tokens` [n] from its parent, ending at sequence length `depth`.

  children: keyed by their first token, in insertion order (a split keeps the old
  continuation first). Every array named in `PER_TOKEN` has one entry per edge token.
  """

  PER_TOKEN: tuple[str, ...] = ()
  __slots__ = ("tokens", "depth", "children")

  def __init__(self, tokens: np.ndarray, depth: int, **per_token: np.ndarray):
    self.tokens, self.depth = tokens, depth
    self.children: dict[int, RadixNode] = {}
    for name in self.PER_TOKEN:
      setattr(self, name, per_token[name])

  def split(self, at: int) -> RadixNode:
    """Cuts the edge after `at` tokens; returns the new upper node (the caller relinks it).

    The lower part (this node) keeps its children and per-node state.
    """
    upper = type(self)(self.tokens[:at], self.depth - len(self.tokens) + at,
                       **{name: getattr(self, name)[:at] for name in self.PER_TOKEN})
    self.tokens = self.tokens[at:]
    for name in self.PER_TOKEN:
      setattr(self, name, getattr(self, name)[at:])
    upper.children[int(self.tokens[0])] = self
    return upper


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
  """How many leading tokens a [n] and b [n] share (n when they are equal)."""
  differ = np.flatnonzero(a != b)
  return int(differ[0]) if len(differ) else len(a)


def walk(root: RadixNode, seq: np.ndarray) -> Iterator[tuple[RadixNode, int, int]]:
  """Yields (node, start, matched): node's first `matched` edge tokens equal seq[start:].

  Every node but the last is matched whole; the last may be matched in part.
  """
  node, pos = root, 0
  while pos < len(seq):
    child = node.children.get(int(seq[pos]))
    if child is None:
      return
    n = min(len(child.tokens), len(seq) - pos)
    matched = shared_prefix(child.tokens[:n], seq[pos:pos + n])
    yield child, pos, matched
    if matched < len(child.tokens):
      return
    node, pos = child, pos + matched
