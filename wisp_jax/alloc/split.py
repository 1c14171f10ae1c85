"""A split of device memory between expert slots and KV blocks.

One `Split` type for everything that divides device memory: the allocator
(`alloc`), the serving engine's budget check (`serving.budget`) and the
online controller all hand the same object around.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class BudgetError(ValueError):
  """A device budget or split that does not fit or cannot serve."""


@dataclasses.dataclass(frozen=True)
class Split:
  """How the pageable device bytes are divided.

  Attributes:
    slots_per_layer: expert slots of each layer, `L` ints (layers may
      differ).
    kv_blocks: blocks in the KV pool.
  """
  slots_per_layer: tuple[int, ...]
  kv_blocks: int

  @classmethod
  def make(cls, slots_per_layer: int | Sequence[int] | np.ndarray,
           kv_blocks: int, num_layers: int) -> "Split":
    """A split with an int (same in every layer) or per-layer slots."""
    slots = np.broadcast_to(np.asarray(slots_per_layer), (num_layers,))
    return cls(tuple(int(s) for s in slots.tolist()), int(kv_blocks))

  @property
  def total_slots(self) -> int:
    return int(sum(self.slots_per_layer))

  def to_dict(self) -> dict:
    return {"slots_per_layer": list(self.slots_per_layer),
            "kv_blocks": self.kv_blocks, "total_slots": self.total_slots}
