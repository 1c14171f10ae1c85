"""Tests of wisp_jax/serving/blocks.py (host-side KV block bookkeeping)."""

import pytest

from wisp_jax.serving.blocks import BlockAllocator


def test_allocator_by_hand():
  alloc = BlockAllocator(6)
  assert alloc.alloc(3) == [0, 1, 2]
  assert alloc.alloc(2) == [3, 4]
  assert (alloc.num_in_use, alloc.num_free, alloc.peak_in_use) == (5, 1, 5)
  alloc.free([1, 3])
  assert (alloc.num_in_use, alloc.num_free, alloc.peak_in_use) == (3, 3, 5)
  # Lowest free ids first.
  assert alloc.alloc(2) == [1, 3]
  assert alloc.alloc(1) == [5]
  assert (alloc.num_in_use, alloc.peak_in_use) == (6, 6)
  assert not alloc.can_alloc(1)
  with pytest.raises(MemoryError, match="1 blocks wanted, 0 of 6 free"):
    alloc.alloc(1)
  alloc.free([0, 1, 2, 3, 4, 5])
  assert (alloc.num_in_use, alloc.num_free, alloc.peak_in_use) == (0, 6, 6)
  with pytest.raises(ValueError, match="block 2 is not in use"):
    alloc.free([2])
  with pytest.raises(ValueError, match="at least one block"):
    BlockAllocator(0)


def test_failed_alloc_takes_nothing():
  alloc = BlockAllocator(4)
  alloc.alloc(3)
  with pytest.raises(MemoryError):
    alloc.alloc(2)
  assert alloc.num_free == 1 and alloc.alloc(1) == [3]
