"""Host-side bookkeeping of a paged KV cache: a page pool with reference counts, and sequences.

The device cache is a pool of `num_pages` pages of `page_size` token slots each
(`kat_jax.sampling.paged` holds the arrays). A sequence's keys/values live in the pages of its
page list: token t in page `pages[t // page_size]`, slot `t % page_size`. Several sequences may
list the same page (the G samples of a GRPO group share their prompt; a tree rollout forks an
episode at a branch point); a page is written only while one sequence holds it, so a write
into a shared page first moves the writer onto a copy (copy-on-write).

Page 0 is never handed out: it is the scratch page that padded and inactive rows write into,
so every write of a jitted step has somewhere harmless to go.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
  """The pool has fewer free pages than a request needs (nothing was changed)."""


class PageAllocator:
  """A pool of fixed-size pages with reference counts (page 0 reserved as scratch)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    self.num_pages = int(num_pages)
    self.page_size = int(page_size)
    self.refcount = np.zeros(num_pages, np.int32)
    self.refcount[SCRATCH_PAGE] = 1
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    """Pages held by sequences (the scratch page not counted)."""
    return self.num_pages - 1 - len(self._free)

  def allocate(self, count: int) -> list[int]:
    """`count` fresh pages, each with one reference."""
    if count > len(self._free):
      raise OutOfPages(f"need {count} pages, {len(self._free)} of {self.num_pages - 1} free")
    pages = [self._free.pop() for _ in range(count)]
    self.refcount[pages] = 1
    return pages

  def share(self, pages: list[int]) -> None:
    """One more reference to each page (a fork)."""
    np.add.at(self.refcount, pages, 1)

  def release(self, pages: list[int]) -> None:
    """Drops one reference to each page; pages left without one go back to the pool."""
    for page in pages:
      if page == SCRATCH_PAGE or self.refcount[page] < 1:
        raise ValueError(f"page {page} released but not held")
      self.refcount[page] -= 1
      if self.refcount[page] == 0:
        self._free.append(page)


@dataclasses.dataclass
class PagedSequence:
  """One sequence's KV: `length` tokens written, in `pages` (which may extend past them)."""
  pages: list[int] = dataclasses.field(default_factory=list)
  length: int = 0

  def fork(self, allocator: PageAllocator) -> "PagedSequence":
    """A sequence sharing every page of this one (no copy until one of them writes)."""
    allocator.share(self.pages)
    return PagedSequence(list(self.pages), self.length)

  def pages_to_write(self, allocator: PageAllocator, new_tokens: int) -> int:
    """Pages `reserve(new_tokens)` would take from the pool."""
    size = allocator.page_size
    first = self.length // size
    shared = sum(allocator.refcount[p] > 1 for p in self.pages[first:])
    return shared + max(0, -(-(self.length + new_tokens) // size) - len(self.pages))

  def reserve(self, allocator: PageAllocator, new_tokens: int) -> list[tuple[int, int]]:
    """Makes slots [length, length + new_tokens) writable by this sequence alone.

    Adds pages as needed and moves every shared page in that range onto a fresh one.
    Returns the (source, destination) page copies the device must make first: a shared page
    holding some of this sequence's tokens (the last, partial page of a forked prompt).
    Raises OutOfPages, changing nothing, when the pool is short.
    """
    need = self.pages_to_write(allocator, new_tokens)
    if need > allocator.num_free:
      raise OutOfPages(f"need {need} pages, {allocator.num_free} free")
    size = allocator.page_size
    copies = []
    for i in range(self.length // size, len(self.pages)):
      page = self.pages[i]
      if allocator.refcount[page] > 1:
        fresh = allocator.allocate(1)[0]
        if i * size < self.length:  # holds tokens of this sequence: copy them
          copies.append((page, fresh))
        allocator.release([page])
        self.pages[i] = fresh
    missing = -(-(self.length + new_tokens) // size) - len(self.pages)
    if missing > 0:
      self.pages.extend(allocator.allocate(missing))
    return copies

  def trim(self, allocator: PageAllocator) -> None:
    """Returns pages past the last written token (reserved but unused) to the pool."""
    keep = -(-self.length // allocator.page_size)
    allocator.release(self.pages[keep:])
    del self.pages[keep:]

  def free(self, allocator: PageAllocator) -> None:
    """Drops every page (the sequence ended)."""
    allocator.release(self.pages)
    self.pages = []
    self.length = 0


def live_tokens(sequences: list[PagedSequence], page_size: int) -> int:
  """Tokens whose KV the pool holds, a shared page counted once (its fullest holder's fill)."""
  fill: dict[int, int] = {}
  for seq in sequences:
    for i, page in enumerate(seq.pages):
      tokens = min(page_size, max(0, seq.length - i * page_size))
      if tokens > fill.get(page, 0):
        fill[page] = tokens
  return sum(fill.values())
