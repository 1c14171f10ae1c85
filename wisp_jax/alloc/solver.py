"""MV-WSA: the equimarginal split of device memory between slots and KV.

`equimarginal` (MV-WSA proper, no search on the objective) treats each max
batch n = 1..C the engine could run with, and for each one spends the
pageable bytes in order of marginal value per byte (`alloc.marginal`), both
pools valued at the batch the current pool allows:

  * from the minimum that can serve (top_k slots per layer, the KV floor),
    the layers' convex-hull slot segments, steepest first (equal marginal
    value per slot across layers), are bought while each is worth more per
    byte than the KV unit (the KV-grid segment with the best average gain,
    valued with the current slots);
  * when the KV unit is worth more, it is bought; the pool's new batch,
    prefill and preemption rates reweigh every slot, so the slots bought
    so far are re-spread over layers at the new weights and buying goes on;
  * it stops when neither pool's next unit has positive value or nothing
    fits; bytes left over go to KV (more blocks never hurt).

Hull segments are exact only at their ends, and KV units are lumpy, so the
split is then balanced slot by slot (`polish`, `_balance`): 1..4 slots move
from the layer whose last slots are worth least to the layer whose next
ones are worth most, and 1 or 2 slots move between the pools (against the
blocks they cost), while the marginal values say the move saves time.

The split whose n has the least time per token wins (C candidates, one
per batch size the engine can be configured with).

`exchange_search` is a local search on the model's objective: from a start it
tries moving 1 or 2 slots, or 1/4 .. 8 KV units' worth of slots, between
the pools (slots re-spread at the best batch) and keeps a move that lowers
the time per token, until none does. It is not part of MV-WSA's measured
quality (`runs/alloc_eval.py` reports the equimarginal split alone).

`solve` is the offline configurator's answer (`runs/allocate.py`):
`method="auto"` returns the exact oracle (`baselines.oracle`) when its
knapsacks are cheap (`ORACLE_WORK_LIMIT`), else the equimarginal split
improved by `exchange`; "marginal", "exchange" and "oracle" force one.

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

__all__ = ["Allocation", "Budget", "BudgetError", "Split", "equimarginal",
           "predict", "prediction", "solve"]

METHODS = ("auto", "marginal", "exchange", "oracle")
_MAX_EXCHANGES = 256
# Exchange moves: slots moved (slot-granular), and KV units' worth of slots.
_SLOT_STEPS = (1, 2)
_KV_UNIT_STEPS = (0.25, 0.5, 1, 2, 4, 8)
# Widths of the slot-granular moves between layers.
_POLISH_WIDTH = 4
# Knapsack cells (n x grid points x L x E x totals) below which `auto`
# returns the exact oracle.
ORACLE_WORK_LIMIT = 2e9


@dataclasses.dataclass(frozen=True)
class Allocation:
  """A split chosen by a method, and what the model predicts for it.

  Attributes:
    method: e.g. "mv-wsa", "mv-wsa-uniform", "oracle", "fixed-50/50".
    split: slots per layer and KV blocks.
    prediction: the model's prediction for `split`.
    details: method-specific scalars (solver used, exchanges, ...).
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


def _segments(per_layer: np.ndarray, start: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Hull segments of every layer from `start`, steepest first: (layer,
  width, drop per slot)."""
  segments = [(slope, layer, b - a) for layer in range(per_layer.shape[0])
              for a, b, slope in lower_hull_segments(per_layer[layer],
                                                     start)]
  segments.sort(key=lambda s: -s[0])  # stable: ties keep layer order
  return (np.array([s[1] for s in segments], np.int64),
          np.array([s[2] for s in segments], np.int64),
          np.array([s[0] for s in segments], np.float64))


def spread(per_layer: np.ndarray, total_slots: int, top_k: int
           ) -> np.ndarray:
  """Caps summing to `total_slots` that equalise marginal values over
  layers: the steepest hull segments from top_k first (the last one cut)."""
  num_layers, width = per_layer.shape[0], per_layer.shape[1] - 1
  left = int(min(total_slots, num_layers * width)) - num_layers * top_k
  if left < 0:
    raise ValueError(f"total_slots={total_slots} is below L x top_k = "
                     f"{num_layers * top_k}.")
  layer, widths, _ = _segments(per_layer, top_k)
  before = np.cumsum(widths) - widths
  taken = np.clip(left - before, 0, widths)
  return top_k + np.bincount(layer, weights=taken,
                             minlength=num_layers).astype(np.int64)


_SPREADS: "weakref.WeakKeyDictionary[Workload, dict]" = (
    weakref.WeakKeyDictionary())


def rebalance(workload: Workload, total_slots: int, concurrency: int,
              kv_blocks: float | None = None) -> np.ndarray:
  """`spread` of `total_slots` at max batch n and a pool of `kv_blocks`
  (default: one where n requests of the longest length fit)."""
  t = throughput.tables(workload)
  kv = t.kv[concurrency - 1].grid[-1] if kv_blocks is None else kv_blocks
  key = (int(total_slots), int(concurrency), float(kv))
  cache = _SPREADS.setdefault(workload, {})
  if key not in cache:
    per_layer, _, _ = throughput.layer_seconds(workload, concurrency, kv)
    cache[key] = spread(per_layer, total_slots, workload.model.top_k)
  return cache[key].copy()


def _kv_ends(workload: Workload, n: int, kv: int, left_blocks: int
             ) -> np.ndarray:
  grid = throughput.tables(workload).kv[n - 1].grid
  return np.unique(np.r_[grid[(grid > kv) & (grid <= kv + left_blocks)],
                         kv + left_blocks]).astype(np.int64)


def _for_batch(workload: Workload, pageable: int, n: int, uniform: bool
               ) -> tuple[np.ndarray, int, dict[str, int]]:
  """The equimarginal split at max batch n (see the module docstring)."""
  w, m = workload, workload.model
  e, bb = w.expert_bytes, w.block_bytes
  layers = m.num_layers
  caps = np.full(layers, m.top_k, np.int64)
  kv = int(w.floor_blocks)
  left = int(pageable - caps.sum() * e - kv * bb)
  counts = {"slot_units": 0, "kv_units": 0}
  rows = np.arange(layers)
  while True:
    per_layer, _, _ = throughput.layer_seconds(w, n, kv)
    # Slots bought so far, re-spread at the current weights.
    if not uniform and caps.sum() > layers * m.top_k:
      caps = spread(per_layer, int(caps.sum()), m.top_k)
    # The KV unit, valued with the current slots (J at each end is
    # base + sum_l per_layer_end[l, c_l], updated as slots are bought).
    ends = _kv_ends(w, n, kv, left // bb) if left >= bb else np.zeros(
        0, np.int64)
    end_tables = [throughput.layer_seconds(w, n, float(b)) for b in ends]
    end_sums = np.array([base + pl[rows, caps].sum()
                         for pl, base, _ in end_tables])
    now = throughput.layer_seconds(w, n, kv)[1] + per_layer[rows,
                                                            caps].sum()

    def kv_unit():
      if not ends.size:
        return 0.0, 0
      value = (now_sum[0] - end_sums) / ((ends - kv) * bb)
      best = int(np.argmax(value))
      return (float(value[best]), int(ends[best] - kv)) if (
          value[best] > 0) else (0.0, 0)

    now_sum = [now]
    if uniform:
      curve = per_layer.sum(axis=0)
      segments = [(a, b, slope) for a, b, slope in
                  lower_hull_segments(curve, int(caps[0]))]
      seg = [(0, b - a, slope) for a, b, slope in segments]
      unit_bytes = layers * e
    else:
      layer, widths, slopes = _segments(per_layer, m.top_k)
      # Only the part of each layer's hull above its current cap.
      seg, start = [], caps.copy()
      position = np.full(layers, m.top_k)
      for l, wd, s in zip(layer, widths, slopes):
        lo, hi = position[l], position[l] + wd
        position[l] = hi
        above = hi - max(lo, start[l])
        if above > 0:
          seg.append((l, int(above), s))
      unit_bytes = e
    kv_value, kv_blocks = kv_unit()
    bought = False
    for l, width, slope in seg:
      value = slope / unit_bytes
      if not value > 0 or value < kv_value:
        break
      width = min(width, left // unit_bytes)
      if width <= 0:
        break
      old = caps.copy()
      if uniform:
        caps += width
      else:
        caps[l] += width
      changed = np.flatnonzero(caps != old)
      for j, (pl, _, _) in enumerate(end_tables):
        end_sums[j] += (pl[changed, caps[changed]] -
                        pl[changed, old[changed]]).sum()
      now_sum[0] += (per_layer[changed, caps[changed]] -
                     per_layer[changed, old[changed]]).sum()
      left -= width * unit_bytes
      counts["slot_units"] += 1
      bought = True
      kv_value, kv_blocks = kv_unit()
    if kv_blocks > 0 and kv_value > 0:
      kv += kv_blocks
      left -= kv_blocks * bb
      counts["kv_units"] += 1
      continue
    if not bought:
      break
  kv += left // bb
  if not uniform and caps.sum() > layers * m.top_k:
    per_layer, _, _ = throughput.layer_seconds(w, n, kv)
    caps = spread(per_layer, int(caps.sum()), m.top_k)
  caps, kv, counts["balance_moves"] = _balance(w, pageable, n, caps, kv,
                                               uniform)
  return caps, int(kv), counts


def polish(per_layer: np.ndarray, caps: np.ndarray, top_k: int,
           widths: int = _POLISH_WIDTH) -> np.ndarray:
  """Slot-granular equimarginal condition across layers: moves w = 1..
  `widths` slots from the layer that loses least to the layer that gains
  most (raw curves, not hulls) while that saves time."""
  caps = caps.copy()
  num_layers, most = per_layer.shape[0], per_layer.shape[1] - 1
  rows = np.arange(num_layers)
  for _ in range(4 * num_layers * most):
    best = (1e-15, None)
    now = per_layer[rows, caps]
    for wd in range(1, widths + 1):
      up = np.where(caps + wd <= most, now - per_layer[
          rows, np.minimum(caps + wd, most)], -np.inf)
      down = np.where(caps - wd >= top_k, per_layer[
          rows, np.maximum(caps - wd, 0)] - now, np.inf)
      gain_layer, loss_layer = int(np.argmax(up)), int(np.argmin(down))
      if gain_layer == loss_layer:  # the second best of either
        up2, down2 = up.copy(), down.copy()
        up2[gain_layer], down2[loss_layer] = -np.inf, np.inf
        options = [(up[gain_layer] - down2.min(), gain_layer,
                    int(np.argmin(down2))),
                   (up2.max() - down[loss_layer], int(np.argmax(up2)),
                    loss_layer)]
        saving, gain_layer, loss_layer = max(options)
      else:
        saving = up[gain_layer] - down[loss_layer]
      if saving > best[0]:
        best = (saving, (wd, gain_layer, loss_layer))
    if best[1] is None:
      break
    wd, gain_layer, loss_layer = best[1]
    caps[gain_layer] += wd
    caps[loss_layer] -= wd
  return caps


def _balance(workload: Workload, pageable: int, n: int, caps: np.ndarray,
             kv: int, uniform: bool) -> tuple[np.ndarray, int, int]:
  """Slot-granular equimarginal condition between the pools at max batch
  n: 1 or 2 slots (of the layer that gains or loses least, or of every
  layer when uniform) against the KV blocks they cost or free, while the
  move saves time per token; layers polished after each move."""
  w, m = workload, workload.model
  e, bb = w.expert_bytes, w.block_bytes
  rows = np.arange(m.num_layers)
  moves = 0

  def value(c, b):
    if b < w.floor_blocks:
      return np.inf
    per_layer, base, _ = throughput.layer_seconds(w, n, float(b))
    return base + per_layer[rows, c].sum()

  if not uniform:
    per_layer, _, _ = throughput.layer_seconds(w, n, float(kv))
    caps = polish(per_layer, caps, m.top_k)
  current = value(caps, kv)
  for _ in range(_MAX_EXCHANGES):
    per_layer, _, _ = throughput.layer_seconds(w, n, float(kv))
    options = []
    for wd in _SLOT_STEPS:
      for sign in (1, -1):
        new = caps.copy()
        if uniform:
          new = new + sign * wd
        else:
          now = per_layer[rows, caps]
          if sign > 0:
            gain = np.where(caps + wd <= m.num_experts, now - per_layer[
                rows, np.minimum(caps + wd, m.num_experts)], -np.inf)
            new[int(np.argmax(gain))] += wd
          else:
            loss = np.where(caps - wd >= m.top_k, per_layer[
                rows, np.maximum(caps - wd, 0)] - now, np.inf)
            new[int(np.argmin(loss))] -= wd
        if new.min() < m.top_k or new.max() > m.num_experts:
          continue
        rest = int((pageable - new.sum() * e) // bb)
        options.append((value(new, rest), new, rest))
    if not options:
      break
    best, new, rest = min(options, key=lambda o: o[0])
    if not best < current * (1 - 1e-12):
      break
    caps, kv, moves = new, rest, moves + 1
    if not uniform:
      per_layer, _, _ = throughput.layer_seconds(w, n, float(kv))
      caps = polish(per_layer, caps, m.top_k)
    current = value(caps, kv)
  return caps, kv, moves


def equimarginal(workload: Workload, budget: Budget, uniform: bool = False
                 ) -> Allocation:
  """MV-WSA's equimarginal split (no search on the objective).

  Raises:
    BudgetError: when dense weights + workspace + KV floor + top_k slots per
      layer exceed the budget (the message states each number).
  """
  w = workload
  pageable = budget.check(w)
  best = None
  for n in range(1, w.concurrency + 1):
    caps, kv, counts = _for_batch(w, pageable, n, uniform)
    value = float(marginal.fixed_batch_seconds(w, caps, n, [kv])[0])
    if best is None or value < best[0]:
      best = (value, n, caps, kv, counts)
  _, n, caps, kv, counts = best
  split = Split.make(caps, kv, w.model.num_layers)
  budget.validate(w, split)
  return Allocation(method="mv-wsa-uniform" if uniform else "mv-wsa",
                    split=split, prediction=prediction(w, split),
                    details={"solver": "marginal", "max_batch": n, **counts})


def _operating_point(workload: Workload, total_slots: int, kv: int,
                     uniform: bool) -> tuple[np.ndarray, float]:
  """The best spread of `total_slots` for any batch KV admits."""
  m = workload.model
  if uniform:
    caps = np.full(m.num_layers, min(total_slots // m.num_layers,
                                     m.num_experts))
    return caps, throughput.per_token_seconds(workload, caps, kv)[0]
  best = (np.inf, None)
  for n in range(1, workload.concurrency + 1):
    caps = rebalance(workload, total_slots, n, kv)
    value = float(marginal.fixed_batch_seconds(workload, caps, n, [kv])[0])
    if value < best[0]:
      best = (value, caps)
  return best[1], best[0]


def exchange_search(workload: Workload, budget: Budget, caps: np.ndarray,
                    kv: int, uniform: bool = False) -> tuple[np.ndarray, int, int]:
  """Local search moving slots against KV (see the module docstring);
  returns caps, KV blocks and the moves made."""
  w, m = workload, workload.model
  granule = m.num_layers if uniform else 1
  unit = marginal.kv_unit_blocks(w)
  pageable = budget.pageable_bytes(w)
  steps = set(_SLOT_STEPS)
  steps |= {max(int(round(s * unit * w.block_bytes / w.expert_bytes /
                          granule)), 1) for s in _KV_UNIT_STEPS}
  best = throughput.per_token_seconds(w, caps, kv)[0]
  moves = 0
  while moves < _MAX_EXCHANGES:
    candidates = []
    total = int(np.sum(caps))
    for step in sorted(steps):
      for sign in (1, -1):
        target = total + sign * step * granule
        if not m.num_layers * m.top_k <= target <= (
            m.num_layers * m.num_experts):
          continue
        rest = int((pageable - target * w.expert_bytes) // w.block_bytes)
        if rest < w.floor_blocks:
          continue
        new_caps, value = _operating_point(w, target, rest, uniform)
        candidates.append((value, new_caps, rest))
    if not candidates:
      break
    value, new_caps, rest = min(candidates, key=lambda c: c[0])
    if not value < best * (1 - 1e-9):
      break
    best, caps, kv, moves = value, new_caps, rest, moves + 1
  return caps, kv, moves


def oracle_work(workload: Workload, budget: Budget) -> float:
  """Knapsack cells the exact per-layer oracle would fill."""
  w, m = workload, workload.model
  t = throughput.tables(w)
  most = (budget.pageable_bytes(w) - w.floor_blocks * w.block_bytes) // (
      w.expert_bytes)
  totals = max(min(m.num_layers * m.num_experts, most), 1)
  grid = sum(table.grid.size for table in t.kv)
  return float(grid * m.num_layers * m.num_experts * totals)


def solve(workload: Workload, budget: Budget, uniform: bool = False,
          rebalance_layers: bool = True, exchange_pass: bool = True,
          uniform_start: bool = True, method: str = "auto",
          exchange: bool | None = None) -> Allocation:
  """The configurator's split of `budget` for `workload`.

  Args:
    workload: the workload (curves, lengths, model, hardware).
    budget: device bytes and workspace.
    uniform: one slot cap for every layer (WiSP) instead of per-layer caps.
    rebalance_layers: unused (the equimarginal split always spreads slots
      at its final weights); kept for callers.
    exchange_pass: run `exchange_search` after the equimarginal split ("auto" when
      the oracle is too costly, "exchange").
    uniform_start: per-layer "exchange": also start from the uniform-cap
      split and keep the better end.
    method: "auto" (the oracle when cheap, else equimarginal + exchange),
      "marginal" (MV-WSA alone), "exchange" or "oracle".
    exchange: alias of `exchange_pass`.

  Returns:
    the allocation; `details["solver"]` says which method produced it and
    `details["greedy_tokens_per_s"]` is the equimarginal split's rate.

  Raises:
    BudgetError: when dense weights + workspace + KV floor + top_k slots per
      layer exceed the budget (the message states each number).
  """
  del rebalance_layers
  if exchange is not None:
    exchange_pass = exchange
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  w = workload
  budget.check(w)
  mv = equimarginal(w, budget, uniform)
  details: dict[str, Any] = {
      "greedy_tokens_per_s": mv.tokens_per_s,
      "greedy_split": mv.split.to_dict(), "exchanges": 0, "start": "greedy",
      "max_batch": mv.details["max_batch"]}
  if method == "auto":
    cheap = uniform or oracle_work(w, budget) <= ORACLE_WORK_LIMIT
    method = "oracle" if cheap else ("exchange" if exchange_pass else
                                     "marginal")
  name = "mv-wsa-uniform" if uniform else "mv-wsa"
  if method == "oracle":
    from wisp_jax.alloc import baselines  # pylint: disable=g-import-not-at-top
    best = baselines.oracle(w, budget, uniform)
    return dataclasses.replace(best, method=name, details={
        **details, **best.details, "solver": "oracle"})
  if method == "marginal":
    return dataclasses.replace(mv, details={**details, "solver": "marginal"})
  starts = [("greedy", np.array(mv.split.slots_per_layer),
             mv.split.kv_blocks)]
  if uniform_start and not uniform:
    flat = equimarginal(w, budget, uniform=True)
    starts.append(("uniform", np.array(flat.split.slots_per_layer),
                   flat.split.kv_blocks))
  ends = []
  for start, caps, kv in starts:
    caps, kv, moves = exchange_search(w, budget, caps, kv, uniform)
    value = throughput.per_token_seconds(w, caps, kv)[0]
    ends.append((value, start, caps, kv, moves))
  _, details["start"], caps, kv, details["exchanges"] = min(
      ends, key=lambda e: e[0])
  split = Split.make(caps, kv, w.model.num_layers)
  budget.validate(w, split)
  return Allocation(method=name, split=split,
                    prediction=prediction(w, split),
                    details={**details, "solver": "exchange"})
