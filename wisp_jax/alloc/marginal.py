"""Marginal values per byte of expert slots and KV blocks.

Both pools are valued in one currency: seconds of device time saved per
generated token, per byte of device memory (the derivative of the
simulator's `J = cycle(n) / n`, `alloc.throughput`).

Expert slots of layer l at capacity c, with n requests running:

  per decode step   (M_l^n(c) - M_l^n(c + 1)) x expert bytes / h2d
                    = seconds saved per step by one more slot; divided by
                    the expert's bytes, per byte (`slot_step_savings`);
  per token         that / n, plus the slot's share of the prefill and
                    recompute traffic: tau u / E x (n / o + preemptions).

LRU curves have cliffs (flat until the working set fits), so one slot's
value can be ~0 just before a large drop. A *slot unit* is therefore the
first segment of the curve's lower convex hull from the current capacity:
the w slots with the best average gain per slot (`slot_units`); buying it
slot by slot would never cross the cliff.

KV blocks: with b blocks the engine admits up to min(C, b / held) requests
and preempts with probability P_full. A *KV unit* is one request's worth
of blocks (ceil(held_blocks)); its value is J(b) - J(b + unit) per byte,
from the simulator. Below the demand of C requests it buys admission (a
bigger batch amortises the dense weights and shares expert loads) and
fewer preemptions; above it, ~0: a step curve (`kv_value_curve`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from wisp_jax.alloc import throughput
from wisp_jax.alloc.workload import Workload


def slot_step_savings(workload: Workload, concurrency: int) -> np.ndarray:
  """`[L, E]` seconds per decode step saved per byte by slot c -> c + 1.

  Column c is the value of the (c+1)-th slot of each layer: the drop of
  the LRU misses per step x expert bytes / h2d bandwidth, over the
  expert's bytes.
  """
  t = throughput.tables(workload)
  if not 1 <= concurrency <= workload.concurrency:
    raise ValueError(f"concurrency must lie in [1, C={workload.concurrency}]"
                     f", got {concurrency}.")
  drop = -np.diff(t.misses[concurrency - 1], axis=1)  # [L, E]
  return drop * t.tau / workload.expert_bytes


@dataclasses.dataclass(frozen=True)
class SlotUnits:
  """The next slot purchase of every layer (or of all layers, uniform).

  Attributes:
    value_per_byte: `[L]` (uniform: `[1]`) seconds per token saved per byte;
      -inf where no slot can be added.
    width: `[L]` (uniform: `[1]`) slots in the unit (per layer).
    concurrency: the n the values were computed at.
  """
  value_per_byte: np.ndarray
  width: np.ndarray
  concurrency: int


def _linear_gain(workload: Workload, n: int, kv_blocks: float) -> float:
  """Misses per cycle that one slot removes from prefill and recompute."""
  t = throughput.tables(workload)
  w = workload
  preempt = float(throughput.full_probability(w, n, kv_blocks)) * n / (
      w.block_size * w.held_blocks)
  return (n / w.mean_output * t.prefill_union
          + preempt * t.recompute_union) / w.model.num_experts


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
    concurrency: n to value at (default: the simulator's best n).

  Returns:
    the units.
  """
  w, t = workload, throughput.tables(workload)
  caps = np.asarray(slots_per_layer, np.int64)
  num_layers, num_experts = w.model.num_layers, w.model.num_experts
  n = concurrency or throughput.per_token_seconds(w, caps, kv_blocks)[1]
  curve = t.misses[n - 1]  # [L, E + 1]
  lin = _linear_gain(w, n, kv_blocks)
  width = np.arange(1, num_experts + 1)
  if uniform:
    if np.any(caps != caps[0]):
      raise ValueError(f"uniform units need equal slots, got {caps}.")
    curve = curve.sum(axis=0, keepdims=True)
    caps, lin, unit_bytes = caps[:1], lin * num_layers, (
        num_layers * w.expert_bytes)
  else:
    unit_bytes = w.expert_bytes
  target = caps[:, None] + width[None, :]  # [L, E]
  ok = (target <= num_experts) & (width[None, :] * unit_bytes <= max_bytes)
  rows = np.arange(caps.size)[:, None]
  gain = (curve[rows[:, 0], caps][:, None]
          - curve[rows, np.minimum(target, num_experts)]) + lin * width
  average = np.where(ok, gain / width, -np.inf)
  best = average.max(axis=1)
  # The hull's first segment: the widest unit with the best average gain.
  ties = ok & (average >= best[:, None] - 1e-12 * np.abs(best[:, None]))
  chosen = num_experts - np.argmax(ties[:, ::-1], axis=1)
  chosen = np.where(np.isfinite(best), chosen, 0)
  value = np.where(np.isfinite(best), best * t.tau / (n * w.expert_bytes),
                   -np.inf)
  return SlotUnits(value_per_byte=value, width=chosen, concurrency=n)


def kv_unit_blocks(workload: Workload) -> int:
  """Blocks of one request's worth of KV: ceil(mean blocks held)."""
  return max(1, math.ceil(workload.held_blocks))


def kv_value(workload: Workload, slots_per_layer: Sequence[int],
             kv_blocks: int, blocks: int | None = None) -> float:
  """Seconds per token saved per byte by `blocks` more KV blocks.

  Args:
    workload: the workload.
    slots_per_layer: current capacities.
    kv_blocks: current KV pool.
    blocks: the unit (default `kv_unit_blocks`).

  Returns:
    (J(kv_blocks) - J(kv_blocks + blocks)) / (blocks x block bytes), >= 0.
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
  w, t = workload, throughput.tables(workload)
  caps = np.asarray(slots_per_layer, np.int64)
  n = concurrency or throughput.per_token_seconds(w, caps, kv_blocks)[1]
  curve = t.misses[n - 1]
  rows = np.arange(caps.size)
  below = np.maximum(caps - 1, 0)
  loss = curve[rows, below] - curve[rows, caps] + _linear_gain(w, n,
                                                               kv_blocks)
  loss = loss * t.tau / (n * w.expert_bytes)
  return np.where(caps > w.model.top_k, loss, np.inf)
