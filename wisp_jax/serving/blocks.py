"""KV blocks on the host: how many a request needs, and who holds which.

Pure Python and NumPy (no JAX): the scheduler and request validation plan
with these; `serving.kv_pool` holds the blocks' keys and values on the
device.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from wisp_jax.models.config import MoEConfig


def blocks_for(num_tokens: int, block_size: int) -> int:
  """Blocks needed to hold `num_tokens` token positions."""
  return -(-int(num_tokens) // int(block_size))


def max_blocks_per_request(config: MoEConfig, block_size: int) -> int:
  """MB: blocks of one request of the model's maximum length."""
  return blocks_for(config.max_seq_len, block_size)


class BlockAllocator:
  """Host-side free list of the pool's block ids.

  Blocks are handed out lowest id first (a heap), so allocation order is
  deterministic and easy to check by hand.
  """

  def __init__(self, num_blocks: int):
    if num_blocks < 1:
      raise ValueError(f"the KV pool needs at least one block, got "
                       f"num_blocks={num_blocks}.")
    self.num_blocks = int(num_blocks)
    self._free = list(range(self.num_blocks))
    heapq.heapify(self._free)
    self._in_use: set[int] = set()
    self.peak_in_use = 0

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_in_use(self) -> int:
    return len(self._in_use)

  def can_alloc(self, count: int) -> bool:
    return count <= len(self._free)

  def alloc(self, count: int) -> list[int]:
    """Takes `count` free blocks (lowest ids first).

    Raises:
      MemoryError: fewer than `count` blocks are free (nothing is taken).
    """
    if count < 0:
      raise ValueError(f"cannot allocate {count} blocks.")
    if count > len(self._free):
      raise MemoryError(f"KV pool exhausted: {count} blocks wanted, "
                        f"{len(self._free)} of {self.num_blocks} free.")
    blocks = [heapq.heappop(self._free) for _ in range(count)]
    self._in_use.update(blocks)
    self.peak_in_use = max(self.peak_in_use, len(self._in_use))
    return blocks

  def free(self, blocks: Sequence[int]) -> None:
    """Returns `blocks` to the free list; raises on a block not in use."""
    for block in blocks:
      if block not in self._in_use:
        raise ValueError(f"block {block} is not in use (double free, or not "
                         f"from this pool of {self.num_blocks}).")
      self._in_use.remove(block)
      heapq.heappush(self._free, block)


def block_table(rows: Sequence[Sequence[int]], max_blocks: int) -> np.ndarray:
  """Stacks per-row block lists into a `[B, MB]` int32 table (0-padded;
  entries past a row's blocks are never read unmasked)."""
  table = np.zeros((len(rows), max_blocks), np.int32)
  for i, blocks in enumerate(rows):
    if len(blocks) > max_blocks:
      raise ValueError(f"row {i} holds {len(blocks)} blocks; the table has "
                       f"room for {max_blocks}.")
    table[i, :len(blocks)] = blocks
  return table
