"""Tests of wisp_jax/alloc/solver.py: MV-WSA's equimarginal split."""

import numpy as np
import pytest

from wisp_jax.alloc import baselines
from wisp_jax.alloc import throughput
from wisp_jax.alloc import solver
from tests.alloc.testlib import make_workload, random_workload

# Layer 0 saves 1 miss per slot up to 4 slots, then 0.5; layer 1's hull is
# one segment 2 -> 6 of 0.25 per slot. With 3 slots above top_k the
# optimum is (5, 2): 1 + 1 + 0.5 = 2.5 misses saved; (4, 3) saves 2.1.
KNOWN = [[4, 4, 3, 2, 1, 0.5, 0], [4, 4, 1, 0.9, 0.8, 0.7, 0]]


def budget_for(workload, extra_slots, extra_bytes=0, workspace=0):
  """A budget with room for top_k slots + `extra_slots` and the floor."""
  w = workload
  slots = 2 * w.model.top_k + extra_slots
  return throughput.Budget(w.dense_bytes + workspace + slots * w.expert_bytes
                         + w.floor_blocks * w.block_bytes + extra_bytes,
                         workspace)


def test_finds_the_known_per_layer_optimum():
  # C = 1: KV above the floor buys nothing, so every byte goes to slots.
  w = make_workload(KNOWN)
  budget = budget_for(w, 3, extra_bytes=w.expert_bytes - 1, workspace=64)
  got = solver.solve(w, budget)
  assert got.split.slots_per_layer == (5, 2)
  # The bytes short of one more slot become KV blocks.
  assert got.split.kv_blocks == w.floor_blocks + (
      (w.expert_bytes - 1) // w.block_bytes)
  best = baselines.oracle(w, budget)
  assert best.split.slots_per_layer == (5, 2)
  assert got.tokens_per_s == pytest.approx(best.tokens_per_s)


def test_uniform_mode_keeps_one_cap():
  w = make_workload(KNOWN)
  got = solver.solve(w, budget_for(w, 3), uniform=True)
  # One more slot in both layers (2 slots) fits; a second round does not.
  assert got.split.slots_per_layer == (3, 3)
  assert got.method == "mv-wsa-uniform"


def test_admission_beats_slots_when_slots_barely_help():
  # Flat curves above top_k: a slot only trims prefill traffic, while a
  # second and third request nearly triple the tokens per step.
  flat = np.array([[8, 8, 3, 3, 3, 3, 3], [8, 8, 3, 3, 3, 3, 3.0]])
  w = make_workload(np.stack([flat, flat * 1.2, flat * 1.4]),
                    concurrency=3, prompt=np.arange(4, 36, 2),
                    output=np.arange(20, 4, -1))
  budget = throughput.Budget(w.dense_bytes + 4 * w.expert_bytes
                           + w.demand_blocks(3) * w.block_bytes
                           + 3 * w.expert_bytes)
  got = solver.solve(w, budget)
  assert got.prediction.concurrency == 3
  assert got.split.kv_blocks >= 3 * w.held_blocks
  assert got.tokens_per_s >= 0.999 * baselines.oracle(w, budget).tokens_per_s


def test_floor_and_top_k_respected_at_the_minimum_budget():
  w = random_workload(1)
  got = solver.solve(w, budget_for(w, 0))
  assert got.split.slots_per_layer == (2, 2)
  assert got.split.kv_blocks == w.floor_blocks


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_near_oracle_and_within_bounds(seed):
  w = random_workload(seed)
  rng = np.random.default_rng(seed)
  budget = budget_for(w, int(rng.integers(0, 9)),
                      extra_bytes=int(rng.integers(0, 80)) * w.block_bytes)
  for uniform in (False, True):
    got = solver.solve(w, budget, uniform=uniform)
    slots = np.array(got.split.slots_per_layer)
    assert slots.min() >= w.model.top_k and slots.max() <= 6
    assert got.split.kv_blocks >= w.floor_blocks
    budget.validate(w, got.split)
    best = baselines.oracle(w, budget, uniform=uniform)
    assert got.tokens_per_s >= 0.97 * best.tokens_per_s
    assert got.tokens_per_s <= best.tokens_per_s * (1 + 1e-9)


def test_passes_only_improve_on_the_greedy():
  w = random_workload(3)
  budget = budget_for(w, 5, extra_bytes=60 * w.block_bytes)
  plain = solver.solve(w, budget, rebalance_layers=False, exchange=False,
                       uniform_start=False)
  full = solver.solve(w, budget)
  assert plain.details["exchanges"] == 0
  assert plain.tokens_per_s == pytest.approx(
      plain.details["greedy_tokens_per_s"])
  assert full.tokens_per_s >= plain.tokens_per_s
  flat = solver.solve(w, budget, uniform=True)
  assert full.tokens_per_s >= flat.tokens_per_s * (1 - 1e-12)


def test_impossible_budget_refused_with_numbers():
  w = random_workload(0)
  budget = budget_for(w, 0, extra_bytes=-1, workspace=1000)
  with pytest.raises(throughput.BudgetError) as error:
    solver.solve(w, budget)
  message = str(error.value)
  floor_bytes = w.floor_blocks * w.block_bytes
  for number in (w.dense_bytes, 1000, floor_bytes, 4 * w.expert_bytes,
                 budget.total_bytes, budget.total_bytes + 1):
    assert str(number) in message


def test_rebalance_spreads_by_hull_segments():
  w = make_workload(KNOWN)
  assert solver.rebalance(w, 7, 1).tolist() == [5, 2]
  assert solver.rebalance(w, 4, 1).tolist() == [2, 2]
  assert solver.rebalance(w, 100, 1).tolist() == [6, 6]
  with pytest.raises(ValueError, match="below"):
    solver.rebalance(w, 3, 1)
  segments = solver.lower_hull_segments(np.array(KNOWN[1]), 2)
  assert [(a, b) for a, b, _ in segments] == [(2, 6)]
