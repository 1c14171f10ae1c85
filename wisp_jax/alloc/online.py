"""Decision rules of an online controller that resizes the two pools.

Pure functions of observed counters; nothing here touches the engine (the
controller hook that calls them is wired separately).

Step-curve rule (`step_curve_split`): the KV value curve is a step (worth a
lot below the demand of the running requests, ~0 above), so keep KV just
above what is used and give the rest to expert slots:

  in_use    = kv_blocks if requests are waiting (KV counts as full)
              else the peak blocks in use over the last window
  target    = max(floor, ceil(in_use x (1 + headroom)))
  dead zone = keep the current split while |target - kv| <= dead_zone x kv
              (no oscillation from noise in the peak)
  slots     = one cap per layer from the rest (clamped to [top_k, E]).

MV rule (`mv_split`): re-estimate the routing curves from the routing the
engine observed (`update_curves`), re-solve MV-WSA and switch only if the
predicted throughput gain exceeds the dead zone.

A move drains the engine, and the drained requests re-prefill what they
held. `drain_seconds` predicts that cost and `window_saving` what a
window would have gained at the new split; a rule that waits until the
savings it passed up add up to the drain's cost (the break-even rule of
ski rental) moves at once on a large gain and never on a small, noisy one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from wisp_jax.alloc import baselines
from wisp_jax.alloc import solver
from wisp_jax.alloc import throughput
from wisp_jax.alloc.curves import RoutingCurves
from wisp_jax.alloc.throughput import Budget, BudgetError, Split
from wisp_jax.alloc.workload import Workload
from wisp_jax.sim import mrc


def kv_target(floor_blocks: int, kv_blocks: int, peak_blocks_in_use: int,
              waiting_requests: int, headroom: float = 0.2,
              dead_zone: float = 0.1) -> int:
  """KV blocks the step-curve rule wants (see the module docstring).

  Args:
    floor_blocks: the admission floor.
    kv_blocks: the pool's current size.
    peak_blocks_in_use: most blocks held at once over the last window.
    waiting_requests: requests queued for lack of KV at the window's end.
    headroom: fraction of spare blocks above the peak.
    dead_zone: relative change below which the pool keeps its size.

  Returns:
    the target size (`kv_blocks` when inside the dead zone).
  """
  if headroom < 0 or dead_zone < 0:
    raise ValueError(f"headroom and dead_zone must be >= 0, got {headroom},"
                     f" {dead_zone}.")
  if peak_blocks_in_use < 0 or peak_blocks_in_use > kv_blocks:
    raise ValueError(f"peak_blocks_in_use={peak_blocks_in_use} must lie in "
                     f"[0, kv_blocks={kv_blocks}].")
  in_use = kv_blocks if waiting_requests > 0 else peak_blocks_in_use
  target = max(floor_blocks, math.ceil(in_use * (1.0 + headroom)))
  if abs(target - kv_blocks) <= dead_zone * kv_blocks:
    return kv_blocks
  return target


def step_curve_split(pageable_bytes: int, expert_bytes: int,
                     block_bytes: int, num_layers: int, top_k: int,
                     num_experts: int, floor_blocks: int, current: Split,
                     peak_blocks_in_use: int, waiting_requests: int,
                     headroom: float = 0.2, dead_zone: float = 0.1
                     ) -> Split:
  """The step-curve rule's next split (uniform slots, KV at its target).

  KV is clamped so that every layer keeps top_k slots; slots are clamped to
  E per layer, and bytes they cannot use go back to KV.

  Raises:
    BudgetError: when the floor and top_k slots per layer do not fit.
  """
  layer_bytes = num_layers * expert_bytes
  most_kv = (pageable_bytes - top_k * layer_bytes) // block_bytes
  if most_kv < floor_blocks:
    raise BudgetError(
        f"{pageable_bytes} pageable bytes cannot hold the KV floor "
        f"{floor_blocks} x {block_bytes} = {floor_blocks * block_bytes} and "
        f"top_k slots {num_layers} x {top_k} x {expert_bytes} = "
        f"{top_k * layer_bytes}.")
  target = kv_target(floor_blocks, current.kv_blocks, peak_blocks_in_use,
                     waiting_requests, headroom, dead_zone)
  kv = int(min(max(target, floor_blocks), most_kv))
  cap = int(min((pageable_bytes - kv * block_bytes) // layer_bytes,
                num_experts))
  kv = int((pageable_bytes - cap * layer_bytes) // block_bytes)
  return Split.make(cap, kv, num_layers)


def update_curves(prior: RoutingCurves, needed_masks: np.ndarray,
                  concurrency: float, weight: float = 1.0
                  ) -> RoutingCurves:
  """Curves with the level measured from observed routing blended in.

  Args:
    prior: the curves so far.
    needed_masks: `[S, L, E]` bool experts each layer needed at each
      observed decode step.
    concurrency: mean requests per observed step.
    weight: weight of the new measurement (1: replace) when a prior level
      lies within 25% of `concurrency`; otherwise the level is inserted.

  Returns:
    new curves.
  """
  if not 0.0 < weight <= 1.0:
    raise ValueError(f"weight must lie in (0, 1], got {weight}.")
  curve = mrc.mattson(np.asarray(needed_masks, bool))
  if curve.num_steps == 0:
    return prior
  misses = curve.misses / curve.num_steps
  refs = curve.references / curve.num_steps
  levels = prior.concurrency
  near = np.abs(levels - concurrency) <= 0.25 * concurrency
  all_misses = prior.misses_per_step.copy()
  all_refs = prior.references_per_step.copy()
  if near.any():
    i = int(np.argmin(np.where(near, np.abs(levels - concurrency), np.inf)))
    all_misses[i] = (1 - weight) * all_misses[i] + weight * misses
    all_refs[i] = (1 - weight) * all_refs[i] + weight * refs
  else:
    i = int(np.searchsorted(levels, concurrency))
    levels = np.insert(levels, i, concurrency)
    all_misses = np.insert(all_misses, i, misses, axis=0)
    all_refs = np.insert(all_refs, i, refs, axis=0)
  return dataclasses.replace(prior, concurrency=levels,
                             misses_per_step=all_misses,
                             references_per_step=all_refs,
                             source=f"{prior.source}; observed n="
                             f"{concurrency:.2f}")


def mv_split(workload: Workload, budget: Budget, current: Split,
             dead_zone: float = 0.05, uniform: bool = False
             ) -> tuple[Split, float]:
  """MV-WSA's split for `workload` if it beats `current` by > dead_zone
  (`uniform`: one cap for every layer, the exact search over the few caps
  that `solver.solve(uniform=True)` returns, without its discarded
  equimarginal pass).

  Returns:
    the split to use (`current` inside the dead zone) and the predicted
    relative gain of the MV-WSA split over `current`.
  """
  now = solver.predict(workload, current)
  best = (baselines.oracle(workload, budget, uniform=True) if uniform
          else solver.solve(workload, budget))
  gain = best.tokens_per_s / now - 1.0
  return (best.split if gain > dead_zone else current), gain


def drain_seconds(workload: Workload, at_split: throughput.Prediction,
                  contexts) -> float:
  """Predicted seconds of re-prefilling the running requests after a drain:
  one prefill pass of each request's held tokens (`contexts`), with the
  expert copies of the workload's mean prefill at the new split
  (`at_split`, its `throughput.prediction`)."""
  contexts = np.asarray(contexts, np.int64)
  if contexts.size == 0:
    return 0.0
  if contexts.min() < 1:
    raise ValueError(f"contexts must be >= 1 token, got {contexts.min()}.")
  costs = throughput.prefill_costs(workload)
  return float(costs[np.minimum(contexts, costs.size - 1)].sum() +
               contexts.size * throughput.tables(workload).tau *
               at_split.prefill_loads_per_prefill)


def window_saving(tokens: float, now_tokens_per_s: float,
                  new_tokens_per_s: float) -> float:
  """Seconds `tokens` output tokens take at the current rate minus at the
  new one (negative when the new one is slower)."""
  if tokens < 0:
    raise ValueError(f"tokens must be >= 0, got {tokens}.")
  return tokens * (1.0 / now_tokens_per_s - 1.0 / new_tokens_per_s)
