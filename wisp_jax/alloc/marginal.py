"""Marginal values per byte of expert slots and KV blocks.

Both pools are valued in one currency: seconds of device time saved per
output token, per byte of device memory (the derivative of the model's
`J = step / tokens`, `alloc.throughput`), at a max batch n and a pool of
b blocks: the batch the pool allows (the KV model's mean batch m, its
prefill and preemption rates) sets the weights of every slot's value.

Expert slots of layer l at capacity c: `layer_seconds(n, b)[l, c]` is the
layer's transfer time per token (decode loads, prefill loads and the
decode loads prefills cause by evicting, at batch m). LRU curves have
cliffs (flat until the working set fits), so one slot's value can be ~0
just before a large drop. A *slot unit* is therefore the first segment of
the curve's lower convex hull from the current capacity: the w slots with
the best average gain per slot (`slot_units`).

KV blocks: more blocks raise the batch the pool admits up to n and lower
preemption. Along b at fixed n the model is piecewise linear in the rates
(a KV grid), so J is a ratio of linear functions on each grid cell and its
best average gain from b is reached at a grid point: a *KV unit* is the
segment from b to the grid point (or the affordable end) with the best
average gain per byte (`kv_unit`). Above n x the longest request it is 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from wisp_jax.alloc import throughput
from wisp_jax.alloc.workload import Workload


def slot_step_savings(workload: Workload, concurrency: int) -> np.ndarray:
  """`[L, E]` seconds per decode pass saved per byte by slot c -> c + 1
  (decode loads at batch n, without prefill effects)."""
  t = throughput.tables(workload)
  if not 1 <= concurrency <= workload.concurrency:
    raise ValueError(f"concurrency must lie in [1, C={workload.concurrency}]"
                     f", got {concurrency}.")
  drop = -np.diff(t.curves["decode_loads"][concurrency - 1], axis=1)
  return drop * t.tau / workload.expert_bytes


@dataclasses.dataclass(frozen=True)
class SlotUnits:
  """The next slot purchase of every layer (or of all layers, uniform).

  Attributes:
    value_per_byte: `[L]` (uniform: `[1]`) seconds per token saved per byte;
      -inf where no slot can be added.
    width: `[L]` (uniform: `[1]`) slots in the unit (per layer).
    concurrency: the max batch n the values were computed at.
  """
  value_per_byte: np.ndarray
  width: np.ndarray
  concurrency: int


def hull_units(curves: np.ndarray, caps: np.ndarray, unit_bytes: float,
               max_bytes: float) -> tuple[np.ndarray, np.ndarray]:
  """First lower-hull segment of each row of `curves` `[R, E + 1]` from
  `caps` `[R]`: (best average drop per slot, its width; 0 and -inf where
  nothing fits)."""
  rows, width = curves.shape[0], curves.shape[1] - 1
  steps = np.arange(1, width + 1)
  target = caps[:, None] + steps[None, :]
  ok = (target <= width) & (steps[None, :] * unit_bytes <= max_bytes)
  r = np.arange(rows)
  gain = curves[r, caps][:, None] - curves[r[:, None],
                                           np.minimum(target, width)]
  average = np.where(ok, gain / steps, -np.inf)
  best = average.max(axis=1)
  # The hull's first segment: the widest unit with the best average gain.
  ties = ok & (average >= best[:, None] - 1e-12 * np.abs(best[:, None]))
  chosen = width - np.argmax(ties[:, ::-1], axis=1)
  return np.where(np.isfinite(best), best, -np.inf), np.where(
      np.isfinite(best), chosen, 0)


def slot_units(workload: Workload, slots_per_layer: Sequence[int],
               kv_blocks: float, max_bytes: float = math.inf,
               uniform: bool = False, concurrency: int | None = None
               ) -> SlotUnits:
  """Values of the next convex-hull slot unit of every layer.

  Args:
    workload: the workload.
    slots_per_layer: current capacities `[L]`.
    kv_blocks: current KV pool.
    max_bytes: bytes available; units are clipped to fit.
    uniform: one unit = w more slots in every layer (one cap for all).
    concurrency: max batch n to value at (default: the model's best n).

  Returns:
    the units.
  """
  w = workload
  caps = np.asarray(slots_per_layer, np.int64)
  n = concurrency or throughput.per_token_seconds(w, caps, kv_blocks)[1]
  per_layer, _, _ = throughput.layer_seconds(w, n, kv_blocks)
  unit_bytes = w.expert_bytes
  if uniform:
    if np.any(caps != caps[0]):
      raise ValueError(f"uniform units need equal slots, got {caps}.")
    per_layer = per_layer.sum(axis=0, keepdims=True)
    caps, unit_bytes = caps[:1], w.model.num_layers * w.expert_bytes
  best, width = hull_units(per_layer, caps, unit_bytes, max_bytes)
  return SlotUnits(value_per_byte=best / unit_bytes, width=width,
                   concurrency=n)


def kv_unit_blocks(workload: Workload) -> int:
  """Blocks of one request's worth of KV: ceil(mean blocks held)."""
  return max(1, math.ceil(workload.held_blocks))


def fixed_batch_seconds(workload: Workload, slots_per_layer: Sequence[int],
                        n: int, kv_blocks) -> np.ndarray:
  """J at max batch n for pool sizes `kv_blocks` `[M]` (inf below the
  floor)."""
  caps = np.asarray(slots_per_layer, np.int64)
  rows = np.arange(caps.size)
  out = []
  for b in np.atleast_1d(kv_blocks):
    if b < workload.floor_blocks:
      out.append(np.inf)
      continue
    per_layer, base, _ = throughput.layer_seconds(workload, n, float(b))
    out.append(base + per_layer[rows, caps].sum())
  return np.array(out)


def kv_unit(workload: Workload, slots_per_layer: Sequence[int], n: int,
            kv_blocks: int, max_blocks: int) -> tuple[float, int]:
  """The KV unit at max batch n: (seconds per token saved per byte, blocks);
  (0, 0) when no grid point above `kv_blocks` helps or fits."""
  if max_blocks < 1:
    return 0.0, 0
  grid = throughput.tables(workload).kv[n - 1].grid
  ends = np.unique(np.r_[grid[(grid > kv_blocks) &
                              (grid <= kv_blocks + max_blocks)],
                         kv_blocks + max_blocks]).astype(np.int64)
  now = fixed_batch_seconds(workload, slots_per_layer, n, [kv_blocks])[0]
  later = fixed_batch_seconds(workload, slots_per_layer, n, ends)
  value = (now - later) / ((ends - kv_blocks) * workload.block_bytes)
  best = int(np.argmax(value))
  if not value[best] > 0:
    return 0.0, 0
  return float(value[best]), int(ends[best] - kv_blocks)


def kv_value(workload: Workload, slots_per_layer: Sequence[int],
             kv_blocks: int, blocks: int | None = None) -> float:
  """Seconds per token saved per byte by `blocks` more KV blocks.

  Args:
    workload: the workload.
    slots_per_layer: current capacities.
    kv_blocks: current KV pool.
    blocks: the unit (default `kv_unit_blocks`).

  Returns:
    (J(kv_blocks) - J(kv_blocks + blocks)) / (blocks x block bytes), >= 0,
    J at the best max batch of each.
  """
  blocks = kv_unit_blocks(workload) if blocks is None else int(blocks)
  if blocks < 1:
    raise ValueError(f"blocks must be >= 1, got {blocks}.")
  now = throughput.per_token_seconds(workload, slots_per_layer, kv_blocks)[0]
  more = throughput.per_token_seconds(workload, slots_per_layer,
                                      kv_blocks + blocks)[0]
  return max(now - more, 0.0) / (blocks * workload.block_bytes)


def kv_value_curve(workload: Workload, slots_per_layer: Sequence[int],
                   kv_grid: Sequence[int] | np.ndarray,
                   blocks: int | None = None) -> np.ndarray:
  """`kv_value` at every pool size of `kv_grid` (the step curve)."""
  return np.array([kv_value(workload, slots_per_layer, int(k), blocks)
                   for k in kv_grid])


def slot_removal_losses(workload: Workload, slots_per_layer: Sequence[int],
                        kv_blocks: float, concurrency: int | None = None
                        ) -> np.ndarray:
  """`[L]` seconds per token lost per byte by removing each layer's last
  slot (+inf where a layer is at top_k)."""
  w = workload
  caps = np.asarray(slots_per_layer, np.int64)
  n = concurrency or throughput.per_token_seconds(w, caps, kv_blocks)[1]
  per_layer, _, _ = throughput.layer_seconds(w, n, kv_blocks)
  rows = np.arange(caps.size)
  loss = (per_layer[rows, np.maximum(caps - 1, 0)] - per_layer[rows, caps]
          ) / w.expert_bytes
  return np.where(caps > w.model.top_k, loss, np.inf)
