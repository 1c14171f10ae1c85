"""Fixed splits and the per-workload oracle, scored on the simulator.

Fixed splits (one cap for all layers; KV gets the rest, never below the
floor):
  50/50          half of the pageable bytes to expert slots.
  experts-first  KV at its floor, everything else to slots.
  fluxmoe-prior  expert share = all expert bytes / (all expert bytes + KV
                 bytes of C requests of the longest sampled length).

Oracle: the best split the simulator knows of.
  uniform   every cap s = top_k..E, KV gets the rest, best concurrency.
  per-layer for every total S of slots and every concurrency n, the
            per-layer caps minimising sum_l M_l^n(c_l) (a knapsack DP over
            layers, exact for any curve shape); KV gets the rest. For a
            fixed S and n the rest of the cycle time does not depend on how
            S is spread over layers, so this is the exact optimum of the
            simulator over all splits.
"""

from __future__ import annotations

import numpy as np

from wisp_jax.alloc import throughput
from wisp_jax.alloc.throughput import Budget, Split
from wisp_jax.alloc.solver import Allocation
from wisp_jax.alloc.workload import Workload
from wisp_jax.sim import cost

FIXED = ("50/50", "experts-first", "fluxmoe-prior")


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


def oracle(workload: Workload, budget: Budget, uniform: bool = False
           ) -> Allocation:
  """The best split on the simulator (see the module docstring).

  Raises:
    BudgetError: as `Budget.check`.
  """
  w, m, t = workload, workload.model, throughput.tables(workload)
  pageable = budget.check(w)
  num_layers, k, num_experts = m.num_layers, m.top_k, m.num_experts
  max_total = min(num_layers * num_experts,
                  (pageable - w.floor_blocks * w.block_bytes)
                  // w.expert_bytes)
  if uniform:
    caps = np.arange(k, max_total // num_layers + 1)
    totals = caps * num_layers
  else:
    totals = np.arange(num_layers * k, max_total + 1)
  kv = (pageable - totals * w.expert_bytes) // w.block_bytes
  best = (np.inf, None, None)
  for n in t.n:
    if uniform:
      misses = t.misses[n - 1][:, caps].sum(axis=0)
      choice = None
    else:
      table, choice = min_layer_misses(t.misses[n - 1], k, max_total)
      misses = table[totals]
    per_token = throughput.cycle_seconds(w, n, kv, misses, totals) / n
    i = int(np.argmin(per_token))
    if per_token[i] < best[0]:
      best = (per_token[i], (n, i), choice)
  _, (n, i), choice = best
  if uniform:
    slots = np.full(num_layers, caps[i])
  else:
    slots = caps_for_total(choice, int(totals[i]))
  split = Split.make(slots, int(kv[i]), num_layers)
  return Allocation(method="oracle-uniform" if uniform else "oracle",
                    split=split, prediction=throughput.prediction(w, split),
                    details={"concurrency": int(n),
                             "candidates": int(totals.size)})
