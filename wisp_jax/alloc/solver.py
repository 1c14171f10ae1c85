"""MV-WSA: the equimarginal split of device memory between slots and KV.

`solve` starts from the minimum that can serve (top_k slots in every layer,
the KV admission floor) and gives each next unit of memory to the pool with
the highest marginal value per byte (`alloc.marginal`): the best convex-hull
slot unit of any layer, or one request's worth of KV blocks. It stops when
no unit has positive value or nothing fits; bytes left over go to KV (extra
blocks never hurt).

Slots and KV interact: more KV admits more requests, which widens the
expert working set, so the greedy pass (which values each unit at the
concurrency of the moment) is path dependent. Two passes follow:

  rebalance  re-spreads the greedy's slot total over layers at the
             concurrency the split actually runs at: the steepest
             convex-hull segments of all layers first (equal marginal
             value per slot in every layer), until the fixed point.
  exchange   checks the equimarginal condition between the pools with the
             slots re-spread: moves 1/4 .. 8 KV units to slots or back
             and keeps a move that lowers the simulator's time per token,
             until none does (a KV unit is worth something only together
             with the slots its extra requests need).

In per-layer mode the exchange pass also runs from the uniform-cap solution
(a second start; uniform caps are per-layer caps too) and the better end
wins.

`uniform=True` keeps one cap for all layers (WiSP's per-layer cap): a slot
unit then adds w slots to every layer.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import numpy as np

from wisp_jax.alloc import marginal
from wisp_jax.alloc import throughput
from wisp_jax.alloc.throughput import (Budget, BudgetError, Prediction, Split,
                                     predict, prediction)
from wisp_jax.alloc.workload import Workload

__all__ = ["Allocation", "Budget", "BudgetError", "Split", "predict",
           "prediction", "solve"]

_MAX_EXCHANGES = 256
# KV moves tried by the exchange pass, in KV units (one request's blocks).
_EXCHANGE_STEPS = (0.25, 0.5, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Allocation:
  """A split chosen by a method, and what the simulator predicts for it.

  Attributes:
    method: e.g. "mv-wsa", "mv-wsa-uniform", "oracle", "fixed-50/50".
    split: slots per layer and KV blocks.
    prediction: the simulator's prediction for `split`.
    details: method-specific scalars (greedy result, exchanges, ...).
  """
  method: str
  split: Split
  prediction: Prediction
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def tokens_per_s(self) -> float:
    return self.prediction.tokens_per_s

  def to_dict(self) -> dict[str, Any]:
    return {"method": self.method, "tokens_per_s": self.tokens_per_s,
            **self.split.to_dict(), "prediction": self.prediction.to_dict(),
            "details": self.details}


def _greedy(workload: Workload, pageable: int, uniform: bool
            ) -> tuple[np.ndarray, int, dict[str, int]]:
  """The equimarginal greedy pass; returns slots, KV blocks and counts."""
  w, m = workload, workload.model
  caps = np.full(m.num_layers, m.top_k, np.int64)
  kv = w.floor_blocks
  left = pageable - caps.sum() * w.expert_bytes - kv * w.block_bytes
  unit = marginal.kv_unit_blocks(w)
  counts = {"slot_units": 0, "kv_units": 0}
  while True:
    su = marginal.slot_units(w, caps, kv, max_bytes=left, uniform=uniform)
    layer = int(np.argmax(su.value_per_byte))
    slot_value = su.value_per_byte[layer]
    kv_step = min(unit, left // w.block_bytes)
    kv_val = (marginal.kv_value(w, caps, kv, kv_step) if kv_step >= 1
              else -np.inf)
    if not max(slot_value, kv_val) > 0:
      break
    if kv_val >= slot_value:
      kv += kv_step
      left -= kv_step * w.block_bytes
      counts["kv_units"] += 1
    else:
      width = int(su.width[0 if uniform else layer])
      if uniform:
        caps += width
      else:
        caps[layer] += width
      left -= width * (caps.size if uniform else 1) * w.expert_bytes
      counts["slot_units"] += 1
  return caps, int(kv + left // w.block_bytes), counts


def lower_hull_segments(curve: np.ndarray, start: int
                        ) -> list[tuple[int, int, float]]:
  """Segments of the lower convex hull of `curve[start:]` (x = capacity).

  Returns:
    `(from_cap, to_cap, drop_per_slot)` in order; drops are non-increasing.
  """
  hull: list[int] = []
  for x in range(start, curve.size):
    while len(hull) >= 2:
      x0, x1 = hull[-2], hull[-1]
      # Drop x1 if it lies on or above the chord x0 -> x.
      if (curve[x1] - curve[x0]) * (x - x0) >= (curve[x] - curve[x0]) * (
          x1 - x0):
        hull.pop()
      else:
        break
    hull.append(x)
  return [(a, b, (curve[a] - curve[b]) / (b - a))
          for a, b in zip(hull[:-1], hull[1:])]


_SEGMENTS: "weakref.WeakKeyDictionary[Workload, dict]" = (
    weakref.WeakKeyDictionary())


def _sorted_segments(workload: Workload, concurrency: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Hull segments of every layer at n, steepest first: (layer, width)."""
  cache = _SEGMENTS.setdefault(workload, {})
  if concurrency not in cache:
    m, t = workload.model, throughput.tables(workload)
    curves = t.misses[concurrency - 1]
    segments = [(slope, layer, b - a) for layer in range(m.num_layers)
                for a, b, slope in lower_hull_segments(curves[layer],
                                                       m.top_k)]
    segments.sort(key=lambda s: -s[0])  # stable: ties keep layer order
    cache[concurrency] = (np.array([s[1] for s in segments], np.int64),
                          np.array([s[2] for s in segments], np.int64))
  return cache[concurrency]


def rebalance(workload: Workload, total_slots: int, concurrency: int
              ) -> np.ndarray:
  """Per-layer caps summing to `total_slots` that equalise marginal values.

  At a fixed concurrency n only the decode misses sum_l M_l^n(c_l) depend
  on how slots are spread (the prefill share of a slot is the same in
  every layer), so the equimarginal spread takes the steepest convex-hull
  segments of all layers, steepest first, from top_k in every layer; the
  last segment may be cut short.
  """
  m = workload.model
  base = m.num_layers * m.top_k
  left = int(min(total_slots, m.num_layers * m.num_experts)) - base
  if left < 0:
    raise ValueError(f"total_slots={total_slots} is below L x top_k = "
                     f"{base}.")
  layer, width = _sorted_segments(workload, concurrency)
  before = np.cumsum(width) - width
  taken = np.clip(left - before, 0, width)
  return m.top_k + np.bincount(layer, weights=taken,
                               minlength=m.num_layers).astype(np.int64)


def _operating_point(workload: Workload, total_slots: int, kv: int,
                     uniform: bool) -> tuple[np.ndarray, float]:
  """The best spread of `total_slots` for any concurrency KV admits."""
  m = workload.model
  if uniform:
    caps = np.full(m.num_layers, min(total_slots // m.num_layers,
                                     m.num_experts))
    return caps, throughput.per_token_seconds(workload, caps, kv)[0]
  most = int(min(workload.concurrency, kv // workload.held_blocks))
  best = (np.inf, None)
  for n in range(1, max(most, 1) + 1):
    caps = rebalance(workload, total_slots, n)
    value = throughput.per_token_seconds(workload, caps, kv)[0]
    if value < best[0]:
      best = (value, caps)
  return best[1], best[0]


def _exchange(workload: Workload, budget: Budget, caps: np.ndarray,
              kv: int, uniform: bool) -> tuple[np.ndarray, int, int]:
  """Moves of KV against slots (`_EXCHANGE_STEPS` units) while one helps."""
  w, m = workload, workload.model
  unit = marginal.kv_unit_blocks(w)
  pageable = budget.pageable_bytes(w)
  best = throughput.per_token_seconds(w, caps, kv)[0]
  moves = 0
  while moves < _MAX_EXCHANGES:
    candidates = []
    for step in _EXCHANGE_STEPS + tuple(-s for s in _EXCHANGE_STEPS):
      target = kv + int(np.sign(step)) * max(int(round(abs(step) * unit)), 1)
      if target < w.floor_blocks:
        continue
      total = min((pageable - target * w.block_bytes) // w.expert_bytes,
                  m.num_layers * m.num_experts)
      if total < m.num_layers * m.top_k:
        continue
      if uniform:
        total -= total % m.num_layers
      rest = int((pageable - total * w.expert_bytes) // w.block_bytes)
      new_caps, value = _operating_point(w, int(total), rest, uniform)
      candidates.append((value, new_caps, rest))
    if not candidates:
      break
    value, new_caps, rest = min(candidates, key=lambda c: c[0])
    if not value < best * (1 - 1e-9):
      break
    best, caps, kv, moves = value, new_caps, rest, moves + 1
  return caps, kv, moves


def solve(workload: Workload, budget: Budget, uniform: bool = False,
          rebalance_layers: bool = True, exchange: bool = True,
          uniform_start: bool = True) -> Allocation:
  """The MV-WSA split of `budget` for `workload`.

  Args:
    workload: the workload (curves, lengths, model, hardware).
    budget: device bytes and workspace.
    uniform: one slot cap for every layer (WiSP) instead of per-layer caps.
    rebalance_layers: after the greedy pass, re-spread the slots over
      layers at the concurrency the split runs at (per-layer mode).
    exchange: run the exchange pass last.
    uniform_start: per-layer mode: also run the exchange pass from the
      uniform-cap solution and keep the better end (uniform caps are
      per-layer caps too, so per-layer is never worse).

  Returns:
    the allocation; `details` holds the greedy pass's split and prediction.

  Raises:
    BudgetError: when dense weights + workspace + KV floor + top_k slots per
      layer exceed the budget (the message states each number).
  """
  w = workload
  pageable = budget.check(w)
  caps, kv, counts = _greedy(w, pageable, uniform)
  greedy_split = Split.make(caps, kv, w.model.num_layers)
  details: dict[str, Any] = {
      **counts, "greedy_tokens_per_s": predict(w, greedy_split),
      "greedy_split": greedy_split.to_dict(), "exchanges": 0}
  if rebalance_layers and not uniform:
    value = throughput.per_token_seconds(w, caps, kv)[0]
    spread, spread_value = _operating_point(w, int(caps.sum()), kv, False)
    if spread_value < value:
      caps = spread
    details["rebalanced_tokens_per_s"] = 1.0 / min(value, spread_value)
  starts = [("greedy", caps, kv)]
  if uniform_start and not uniform:
    flat = solve(w, budget, uniform=True, exchange=exchange)
    starts.append(("uniform", np.array(flat.split.slots_per_layer),
                   flat.split.kv_blocks))
  ends = []
  for name, start_caps, start_kv in starts:
    moves = 0
    if exchange:
      start_caps, start_kv, moves = _exchange(w, budget, start_caps,
                                              start_kv, uniform)
    value = throughput.per_token_seconds(w, start_caps, start_kv)[0]
    ends.append((value, name, start_caps, start_kv, moves))
  _, details["start"], caps, kv, details["exchanges"] = min(
      ends, key=lambda e: e[0])
  split = Split.make(caps, kv, workload.model.num_layers)
  budget.validate(workload, split)
  return Allocation(method="mv-wsa-uniform" if uniform else "mv-wsa",
                    split=split, prediction=prediction(workload, split),
                    details=details)
