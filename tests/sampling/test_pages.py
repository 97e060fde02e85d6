"""Host-side page pool of the rollout engine: reference counts, forks, copy-on-write, no leaks."""

import numpy as np
import pytest

from kat_jax.sampling.pages import (SCRATCH_PAGE, OutOfPages, PageAllocator, PagedSequence,
                                    live_tokens)


def _check_counts(allocator, sequences):
  """Every page's reference count equals the sequences listing it; free pages have none."""
  want = np.zeros(allocator.num_pages, np.int32)
  want[SCRATCH_PAGE] = 1
  for seq in sequences:
    np.add.at(want, seq.pages, 1)
  np.testing.assert_array_equal(allocator.refcount, want)
  assert allocator.num_used == int((want[1:] > 0).sum())


def test_no_page_leak_after_1000_random_requests_with_forks_and_extends():
  rng = np.random.default_rng(0)
  allocator = PageAllocator(num_pages=200, page_size=8)
  live: list[PagedSequence] = []
  for _ in range(1000):
    op = rng.integers(4)
    if op == 0 or not live:  # a new request: prompt reserved and written
      seq = PagedSequence()
      try:
        seq.reserve(allocator, int(rng.integers(1, 40)))
      except OutOfPages:
        continue
      seq.length = int(rng.integers(1, 40))
      seq.length = min(seq.length, len(seq.pages) * 8)
      live.append(seq)
    elif op == 1:  # fork (a group sample or a tree branch)
      live.append(live[int(rng.integers(len(live)))].fork(allocator))
    elif op == 2:  # decode / extend: reserve, write some, trim the rest
      seq = live[int(rng.integers(len(live)))]
      new = int(rng.integers(1, 20))
      try:
        seq.reserve(allocator, new)
      except OutOfPages:
        continue
      seq.length += int(rng.integers(0, new + 1))
      seq.trim(allocator)
    else:  # the request ends
      live.pop(int(rng.integers(len(live)))).free(allocator)
    _check_counts(allocator, live)
  for seq in live:
    seq.free(allocator)
  assert allocator.num_used == 0 and allocator.num_free == 199


def test_group_of_8_samples_holds_the_prompt_pages_once():
  allocator = PageAllocator(num_pages=64, page_size=4)
  prompt = PagedSequence()
  prompt.reserve(allocator, 21)
  prompt.length = 21  # 5 full pages + 1 token in a sixth
  samples = [prompt.fork(allocator) for _ in range(8)]
  prompt.free(allocator)
  assert allocator.num_used == 6  # one copy of the prompt for 8 samples
  assert live_tokens(samples, 4) == 21
  copies = [s.reserve(allocator, 1) for s in samples]
  # The first 7 writers copy the partial page; the last holds the original alone.
  assert [len(c) for c in copies] == [1] * 7 + [0]
  assert all(c[0][0] == samples[7].pages[5] for c in copies[:7])
  assert allocator.num_used == 5 + 8
  assert all(s.pages[:5] == samples[0].pages[:5] for s in samples)
  _check_counts(allocator, samples)


def test_reserve_of_a_shared_unwritten_page_takes_a_fresh_page_without_copy():
  allocator = PageAllocator(num_pages=16, page_size=4)
  seq = PagedSequence()
  seq.reserve(allocator, 8)
  seq.length = 4  # page 2 reserved, not written
  child = seq.fork(allocator)
  assert child.reserve(allocator, 2) == []
  assert child.pages[0] == seq.pages[0] and child.pages[1] != seq.pages[1]


def test_reserve_out_of_pages_changes_nothing():
  allocator = PageAllocator(num_pages=4, page_size=4)
  seq = PagedSequence()
  seq.reserve(allocator, 6)
  seq.length = 6
  child = seq.fork(allocator)
  before = (allocator.refcount.copy(), list(child.pages), allocator.num_free)
  with pytest.raises(OutOfPages):
    child.reserve(allocator, 8)  # needs a copy of page 2 and 2 new pages; 1 is free
  assert (allocator.refcount == before[0]).all() and child.pages == before[1]
  assert allocator.num_free == before[2]


def test_releasing_a_page_not_held_is_an_error():
  allocator = PageAllocator(num_pages=4, page_size=4)
  with pytest.raises(ValueError, match="not held"):
    allocator.release([2])
