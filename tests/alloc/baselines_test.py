"""Tests of wisp_jax/alloc/baselines.py: fixed splits and the oracle."""

import itertools

import numpy as np
import pytest

from wisp_jax.alloc import baselines
from wisp_jax.alloc import throughput
from wisp_jax.alloc import solver
from wisp_jax.sim import cost
from tests.alloc.testlib import random_workload


def budget_for(workload, extra_slots, extra_blocks=0):
  w = workload
  return throughput.Budget(
      w.dense_bytes + (4 + extra_slots) * w.expert_bytes
      + (w.floor_blocks + extra_blocks) * w.block_bytes)


def test_knapsack_dp_matches_brute_force():
  rng = np.random.default_rng(0)
  curves = np.cumsum(rng.exponential(1.0, (3, 6))[:, ::-1], axis=1)[:, ::-1]
  curves = np.concatenate([curves, np.zeros((3, 1))], axis=1)  # [3, 7]
  best, choice = baselines.min_layer_misses(curves, 2, 18)
  for total in range(0, 19):
    combos = [c for c in itertools.product(range(2, 7), repeat=3)
              if sum(c) == total]
    if not combos:
      assert np.isinf(best[total])
      continue
    brute = min(sum(curves[l, c[l]] for l in range(3)) for c in combos)
    assert best[total] == pytest.approx(brute)
    caps = baselines.caps_for_total(choice, total)
    assert caps.sum() == total
    assert sum(curves[l, caps[l]] for l in range(3)) == pytest.approx(brute)


@pytest.mark.parametrize("seed", range(4))
def test_oracle_is_the_best_split_by_brute_force(seed):
  w = random_workload(seed)
  budget = budget_for(w, 6, extra_blocks=40)
  best = baselines.oracle(w, budget)
  brute = max(throughput.predict(w, budget.fill(w, caps))
              for caps in itertools.product(range(2, 7), repeat=2)
              if budget.fill(w, caps).kv_blocks >= w.floor_blocks)
  assert best.tokens_per_s == pytest.approx(brute, rel=1e-12)
  budget.validate(w, best.split)


@pytest.mark.parametrize("seed", range(4))
def test_oracle_beats_every_fixed_split_and_mv_wsa(seed):
  w = random_workload(seed, concurrency=3)
  for extra in (0, 3, 8):
    budget = budget_for(w, extra, extra_blocks=25)
    best = baselines.oracle(w, budget)
    uniform = baselines.oracle(w, budget, uniform=True)
    assert best.tokens_per_s >= uniform.tokens_per_s * (1 - 1e-12)
    contenders = list(baselines.fixed_allocations(w, budget).values())
    contenders += [solver.solve(w, budget),
                   solver.solve(w, budget, uniform=True)]
    for other in contenders:
      assert best.tokens_per_s >= other.tokens_per_s * (1 - 1e-12)
      if other.method != "mv-wsa":  # the rest keep one cap for all layers
        assert uniform.tokens_per_s >= other.tokens_per_s * (1 - 1e-12)


def test_fixed_split_shares():
  w = random_workload(2, concurrency=2)
  budget = budget_for(w, 4, extra_blocks=60)
  pageable = budget.pageable_bytes(w)
  layer_bytes = 2 * w.expert_bytes
  splits = {name: baselines.fixed_split(w, budget, name)
            for name in baselines.FIXED}
  for split in splits.values():
    budget.validate(w, split)
    assert len(set(split.slots_per_layer)) == 1
    # KV gets every byte the slots leave.
    assert pageable - split.total_slots * w.expert_bytes - (
        split.kv_blocks * w.block_bytes) < w.block_bytes
  half = splits["50/50"].total_slots * w.expert_bytes
  assert splits["50/50"].slots_per_layer[0] < 6  # not capped at E
  assert pageable / 2 - layer_bytes < half <= pageable / 2
  first = splits["experts-first"]
  most = (pageable - w.floor_blocks * w.block_bytes) // layer_bytes
  assert first.slots_per_layer[0] == min(most, 6)
  experts = cost.all_experts_bytes(w.model)
  share = experts / (experts + 2 * w.max_len * cost.kv_bytes_per_token(
      w.model))
  assert baselines.expert_share(w, "fluxmoe-prior") == pytest.approx(share)
  with pytest.raises(ValueError, match="unknown fixed split"):
    baselines.fixed_split(w, budget, "60/40")


def test_fixed_split_never_below_the_floor():
  w = random_workload(0)
  budget = budget_for(w, 8)  # 50/50 would leave KV below its floor
  split = baselines.fixed_split(w, budget, "50/50")
  assert split.kv_blocks >= w.floor_blocks
  assert min(split.slots_per_layer) >= 2
