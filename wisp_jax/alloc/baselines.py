"""Fixed splits and the per-workload oracle, scored on the model.

Fixed splits (one cap for all layers; KV gets the rest, never below the
floor):
  50/50          half of the pageable bytes to expert slots.
  experts-first  KV at its floor, everything else to slots.
  fluxmoe-prior  expert share = all expert bytes / (all expert bytes + KV
                 bytes of C requests of the longest sampled length).

Oracle: the best split the model knows of.
  uniform   every cap s = top_k..E and max batch n, KV gets the rest.
  per-layer for every max batch n and total S of slots, KV gets the rest
            (b blocks) and the caps minimise the layers' transfer time per
            token, sum_l W_l(c_l) (a knapsack DP over layers, exact for any
            curve shape): at fixed n and S nothing else depends on how S
            is spread. W's weights (the batch, prefill and token rates of
            the KV model) are constant where the pool cannot bind (b >= n
            x the longest request: one DP per n, exact) and interpolated
            between KV-grid points elsewhere; there the DP runs at the
            weights of every grid point and each S takes the better of the
            optima of the two points around its b, scored with its own
            weights; the REFINE best of those totals per n are solved
            again at their own weights (tests check it against brute
            force).
"""

from __future__ import annotations

import numpy as np

from wisp_jax.alloc import throughput
from wisp_jax.alloc.throughput import Budget, Split
from wisp_jax.alloc.solver import Allocation
from wisp_jax.alloc.workload import Workload
from wisp_jax.sim import cost

FIXED = ("50/50", "experts-first", "fluxmoe-prior")
# Totals per max batch re-solved at their own weights (see `oracle`).
REFINE = 3


def expert_share(workload: Workload, name: str) -> float | None:
  """Fraction of the pageable bytes a fixed split gives to experts."""
  w = workload
  if name == "50/50":
    return 0.5
  if name == "fluxmoe-prior":
    experts = cost.all_experts_bytes(w.model, w.bytes_per_param)
    kv = w.concurrency * w.max_len * cost.kv_bytes_per_token(w.model,
                                                             w.kv_width)
    return experts / (experts + kv)
  if name == "experts-first":
    return None
  raise ValueError(f"unknown fixed split {name!r}; use one of {FIXED}.")


def fixed_split(workload: Workload, budget: Budget, name: str) -> Split:
  """The uniform-cap split of fixed rule `name` (see the module docstring)."""
  w, m = workload, workload.model
  pageable = budget.check(w)
  share = expert_share(w, name)
  layer_bytes = m.num_layers * w.expert_bytes
  most = (pageable - w.floor_blocks * w.block_bytes) // layer_bytes
  cap = most if share is None else int(share * pageable // layer_bytes)
  cap = int(np.clip(min(cap, most), m.top_k, m.num_experts))
  return budget.fill(w, cap)


def fixed_allocations(workload: Workload, budget: Budget
                      ) -> dict[str, Allocation]:
  """Every fixed split with its prediction."""
  out = {}
  for name in FIXED:
    split = fixed_split(workload, budget, name)
    share = expert_share(workload, name)
    out[name] = Allocation(
        method=f"fixed-{name}", split=split,
        prediction=throughput.prediction(workload, split),
        details={"expert_share": share})
  return out


def min_layer_misses(curves: np.ndarray, min_cap: int, max_total: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Knapsack DP: least sum_l curves[l, c_l] with sum c_l = S, c_l >= min.

  Args:
    curves: `[L, E + 1]` misses per step by capacity.
    min_cap: smallest cap of a layer (top_k).
    max_total: largest total S to solve for.

  Returns:
    `best [max_total + 1]` (inf where infeasible) and `choice [L,
    max_total + 1]` int: layer l's cap in the optimum for the first l + 1
    layers summing to S (backtrack with `caps_for_total`).
  """
  num_layers, width = curves.shape
  best = np.full(max_total + 1, np.inf)
  best[0] = 0.0
  choice = np.zeros((num_layers, max_total + 1), np.int16)
  for layer in range(num_layers):
    new = np.full(max_total + 1, np.inf)
    pick = np.zeros(max_total + 1, np.int16)
    for cap in range(min_cap, min(width - 1, max_total) + 1):
      cand = best[:max_total + 1 - cap] + curves[layer, cap]
      better = cand < new[cap:]
      new[cap:][better] = cand[better]
      pick[cap:][better] = cap
    best, choice[layer] = new, pick
  return best, choice


def caps_for_total(choice: np.ndarray, total: int) -> np.ndarray:
  """Backtracks `min_layer_misses`' choice to `[L]` caps summing to total."""
  caps = np.zeros(choice.shape[0], np.int64)
  for layer in range(choice.shape[0] - 1, -1, -1):
    caps[layer] = choice[layer, total]
    total -= caps[layer]
  if total != 0:
    raise ValueError("no per-layer caps reach this total.")
  return caps


def caps_for_totals(choice: np.ndarray, totals: np.ndarray) -> np.ndarray:
  """`caps_for_total` for many totals at once: `[T, L]`."""
  totals = np.asarray(totals, np.int64).copy()
  caps = np.zeros((totals.size, choice.shape[0]), np.int64)
  for layer in range(choice.shape[0] - 1, -1, -1):
    caps[:, layer] = choice[layer, totals]
    totals -= caps[:, layer]
  if np.any(totals != 0):
    raise ValueError("no per-layer caps reach these totals.")
  return caps


def _curve_terms(workload: Workload, n: int, kv: np.ndarray):
  """Rates and level weights of the model at (n, kv[i])."""
  op = throughput.operating_point(workload, n, kv)
  lo, hi, frac = throughput.level_weights(workload, op["batch"])
  prefills = op["new_prefills"] + op["recompute_prefills"]
  return op, lo, hi, frac, prefills


def _layer_loads(t, lo, hi, frac, op, prefills) -> np.ndarray:
  """`[T, L, E + 1]` loads per step of every layer and capacity."""
  cv = t.curves
  mix = lambda name: ((1 - frac)[:, None, None] * cv[name][lo] +
                      frac[:, None, None] * cv[name][hi])
  rate = lambda v: np.asarray(v, np.float64)[:, None, None]
  return (rate(op["decodes"]) * mix("decode_loads") +
          rate(op["new_prefills"]) * mix("prefill_loads") +
          rate(op["recompute_prefills"]) * mix("recompute_loads") +
          rate(prefills) * mix("eviction_loads"))


def _score(t, workload, n, kv, caps) -> np.ndarray:
  """J of caps `[T, L]` at pools kv `[T]`, max batch n."""
  op, lo, hi, frac, prefills = _curve_terms(workload, n, kv)
  cv = t.curves
  rows = np.arange(caps.shape[1])[None, :]

  def at(name):
    return ((1 - frac)[:, None] * cv[name][lo[:, None], rows, caps] +
            frac[:, None] * cv[name][hi[:, None], rows, caps]).sum(axis=1)

  loads = (op["decodes"] * at("decode_loads") +
           op["new_prefills"] * at("prefill_loads") +
           op["recompute_prefills"] * at("recompute_loads") +
           prefills * at("eviction_loads"))
  return (op["base_seconds"] + t.tau * loads) / op["tokens"]


def oracle(workload: Workload, budget: Budget, uniform: bool = False
           ) -> Allocation:
  """The best split on the model (see the module docstring).

  Raises:
    BudgetError: as `Budget.check`.
  """
  w, m, t = workload, workload.model, throughput.tables(workload)
  pageable = budget.check(w)
  num_layers, k, num_experts = m.num_layers, m.top_k, m.num_experts
  max_total = int(min(num_layers * num_experts,
                      (pageable - w.floor_blocks * w.block_bytes)
                      // w.expert_bytes))
  if uniform:
    caps_u = np.arange(k, max_total // num_layers + 1)
    totals = caps_u * num_layers
  else:
    totals = np.arange(num_layers * k, max_total + 1)
  kv = ((pageable - totals * w.expert_bytes) // w.block_bytes).astype(
      np.float64)
  best = (np.inf, None, None, None)
  dps = 0
  for n in range(1, w.concurrency + 1):
    if uniform:
      caps = np.repeat(caps_u[:, None], num_layers, axis=1)
      score = _score(t, w, n, kv, caps)
    else:
      grid = t.kv[n - 1].grid
      cell = np.clip(np.searchsorted(grid, kv, side="right") - 1, 0,
                     grid.size - 1)
      ends = np.stack([cell, np.minimum(cell + 1, grid.size - 1)])
      score = np.full(totals.size, np.inf)
      caps = np.zeros((totals.size, num_layers), np.int64)
      for g in np.unique(ends):
        op, lo, hi, frac, prefills = _curve_terms(w, n, grid[g:g + 1])
        curve = _layer_loads(t, lo, hi, frac, op, prefills)[0]
        _, choice = min_layer_misses(curve, k, max_total)
        dps += 1
        pick = np.flatnonzero((ends == g).any(axis=0))
        cand = caps_for_totals(choice, totals[pick])
        value = _score(t, w, n, kv[pick], cand)
        better = value < score[pick]
        score[pick[better]] = value[better]
        caps[pick[better]] = cand[better]
      # The best totals whose pool can bind: one knapsack at their own
      # weights (exact for them).
      inside = np.flatnonzero(kv < grid[-1])
      for i in inside[np.argsort(score[inside])[:REFINE]]:
        op, lo, hi, frac, prefills = _curve_terms(w, n, kv[i:i + 1])
        curve = _layer_loads(t, lo, hi, frac, op, prefills)[0]
        _, choice = min_layer_misses(curve, k, max_total)
        dps += 1
        cand = caps_for_totals(choice, totals[i:i + 1])
        value = _score(t, w, n, kv[i:i + 1], cand)[0]
        if value < score[i]:
          score[i], caps[i] = value, cand[0]
    i = int(np.argmin(score))
    if score[i] < best[0]:
      best = (score[i], n, i, caps[i])
  _, n, i, slots = best
  split = Split.make(slots, int(kv[i]), num_layers)
  return Allocation(method="oracle-uniform" if uniform else "oracle",
                    split=split, prediction=throughput.prediction(w, split),
                    details={"concurrency": int(n),
                             "candidates": int(totals.size),
                             "knapsacks": dps})
