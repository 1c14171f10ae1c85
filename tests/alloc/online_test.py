"""Tests of wisp_jax/alloc/online.py: the controller's decision rules."""

import numpy as np
import pytest

from wisp_jax.alloc import baselines
from wisp_jax.alloc import online
from wisp_jax.alloc import solver
from wisp_jax.alloc import throughput
from wisp_jax.alloc.curves import RoutingCurves
from wisp_jax.sim import mrc
from tests.alloc.testlib import random_workload


def test_kv_target_rules():
  # Peak 50 of 100 in use, 20% headroom: shrink to 60.
  assert online.kv_target(10, 100, 50, 0) == 60
  # Waiting requests: the pool counts as full, grow by the headroom.
  assert online.kv_target(10, 100, 50, 3) == 120
  # Inside the dead zone: 88 x 1.2 -> 106 is within 10% of 100.
  assert online.kv_target(10, 100, 88, 0) == 100
  # Never below the floor.
  assert online.kv_target(80, 100, 5, 0) == 80
  with pytest.raises(ValueError, match="peak_blocks_in_use"):
    online.kv_target(10, 100, 120, 0)


def test_step_curve_split_gives_the_rest_to_slots():
  kwargs = dict(pageable_bytes=10_000, expert_bytes=100, block_bytes=10,
                num_layers=4, top_k=2, num_experts=8, floor_blocks=50)
  current = throughput.Split.make(5, 400, 4)
  got = online.step_curve_split(current=current, peak_blocks_in_use=200,
                                waiting_requests=0, **kwargs)
  # KV target 240 blocks = 2400 bytes; 7600 bytes / 400 per cap = 19,
  # clamped to E = 8; the rest (10000 - 3200) / 10 = 680 blocks.
  assert got == throughput.Split.make(8, 680, 4)
  grown = online.step_curve_split(current=current, peak_blocks_in_use=400,
                                  waiting_requests=2, **kwargs)
  # Target 480 blocks leaves 5200 bytes: 13 per layer, clamped to 8.
  assert grown.kv_blocks == 680 and grown.slots_per_layer == (8,) * 4
  # A target past the bytes left after top_k slots is clamped there.
  big = online.step_curve_split(
      current=throughput.Split.make(2, 900, 4), peak_blocks_in_use=900,
      waiting_requests=1, **kwargs)
  assert big == throughput.Split.make(2, 920, 4)
  with pytest.raises(throughput.BudgetError, match="floor"):
    online.step_curve_split(**{**kwargs, "floor_blocks": 930},
                            current=current, peak_blocks_in_use=0,
                            waiting_requests=0)


def test_update_curves_replaces_near_level_or_inserts():
  prior = RoutingCurves(np.array([1.0, 4.0]), np.zeros((2, 2, 7)),
                        np.zeros((2, 2)), top_k=2)
  rng = np.random.default_rng(0)
  masks = rng.random((30, 2, 6)) < 0.4
  measured = mrc.mattson(masks)
  replaced = online.update_curves(prior, masks, 3.5)
  assert replaced.concurrency.tolist() == [1.0, 4.0]
  np.testing.assert_allclose(replaced.misses_per_step[1],
                             measured.misses / 30)
  half = online.update_curves(prior, masks, 4.0, weight=0.5)
  np.testing.assert_allclose(half.misses_per_step[1], measured.misses / 60)
  inserted = online.update_curves(prior, masks, 2.0)
  assert inserted.concurrency.tolist() == [1.0, 2.0, 4.0]
  np.testing.assert_allclose(inserted.references_per_step[1],
                             measured.references / 30)


def test_mv_split_switches_only_outside_the_dead_zone():
  w = random_workload(4, concurrency=3)
  budget = throughput.Budget(w.dense_bytes + 10 * w.expert_bytes
                           + (w.floor_blocks + 30) * w.block_bytes)
  good = baselines.oracle(w, budget).split
  kept, gain = online.mv_split(w, budget, good)
  assert kept == good and gain <= 1e-9
  bad = budget.fill(w, 2)  # every byte to KV
  assert throughput.predict(w, bad) < 0.9 * throughput.predict(w, good)
  switched, gain = online.mv_split(w, budget, bad)
  assert gain > 0.1 and switched != bad
  assert throughput.predict(w, switched) > throughput.predict(w, bad)


def test_uniform_mv_split_is_the_solvers_uniform_answer():
  w = random_workload(4, concurrency=3)
  budget = throughput.Budget(w.dense_bytes + 10 * w.expert_bytes
                           + (w.floor_blocks + 30) * w.block_bytes)
  bad = budget.fill(w, 2)  # every byte to KV
  switched, gain = online.mv_split(w, budget, bad, uniform=True)
  want = solver.solve(w, budget, uniform=True)
  assert switched == want.split
  assert len(set(switched.slots_per_layer)) == 1
  assert gain == want.tokens_per_s / throughput.predict(w, bad) - 1


def test_drain_and_window_saving_price_a_move():
  w = random_workload(4, concurrency=3)
  budget = throughput.Budget(w.dense_bytes + 10 * w.expert_bytes
                           + (w.floor_blocks + 30) * w.block_bytes)
  good = baselines.oracle(w, budget).split
  bad = budget.fill(w, 2)  # every byte to KV
  at_bad = throughput.prediction(w, bad)
  assert online.drain_seconds(w, at_bad, []) == 0.0
  # One prefill pass per drained request, its expert loads at the split.
  costs = throughput.prefill_costs(w)
  loads = at_bad.prefill_loads_per_prefill
  assert loads > 0
  want = costs[10] + costs[30] + 2 * throughput.tables(w).tau * loads
  assert online.drain_seconds(w, at_bad, [10, 30]) == pytest.approx(want)
  assert online.drain_seconds(w, at_bad, [10, 30, 30]) > want
  with pytest.raises(ValueError, match="contexts"):
    online.drain_seconds(w, at_bad, [0])
  # 100 tokens at the better split take less time than at the worse.
  slow, fast = throughput.predict(w, bad), throughput.predict(w, good)
  assert fast > slow
  saving = online.window_saving(100, slow, fast)
  assert saving == pytest.approx(100 / slow - 100 / fast)
  assert saving > 0 > online.window_saving(100, fast, slow)
  assert online.window_saving(100, fast, fast) == 0.0
  with pytest.raises(ValueError, match="tokens"):
    online.window_saving(-1, slow, fast)
