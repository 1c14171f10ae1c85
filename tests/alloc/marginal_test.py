"""Tests of wisp_jax/alloc/marginal.py: values per byte of slots and KV."""

import numpy as np
import pytest

from wisp_jax.alloc import marginal
from wisp_jax.alloc import throughput
from tests.alloc.testlib import TOY_DEVICE, make_workload

# Layer 0 has a cliff: nothing helps until all 6 experts fit.
CLIFF = [[6, 6, 5, 5, 5, 5, 0], [4, 4, 2, 1, 0.5, 0.25, 0]]


def test_slot_step_savings_is_miss_drop_over_bandwidth():
  w = make_workload(CLIFF)
  savings = marginal.slot_step_savings(w, 1)
  # (drop in misses per step) x expert bytes / h2d, per expert byte.
  drops = -np.diff(np.array(CLIFF), axis=1)
  np.testing.assert_allclose(savings,
                             drops / TOY_DEVICE["h2d_bytes_per_s"])
  assert savings[0, 2] == 0.0 and savings[0, 5] > 0


def test_slot_unit_crosses_the_cliff():
  w = make_workload(CLIFF)
  units = marginal.slot_units(w, [2, 2], w.floor_blocks)
  # The first raw marginal of layer 0 is 0, but its hull unit buys all 4
  # slots up to the cliff: 5 misses / 4 slots = 1.25 per slot, more than
  # layer 1's best unit (2 -> 3: 1 per slot; its curve is convex).
  assert units.width.tolist() == [4, 1]
  assert units.value_per_byte[0] > units.value_per_byte[1] > 0
  clipped = marginal.slot_units(w, [2, 2], w.floor_blocks,
                                max_bytes=2 * w.expert_bytes)
  # Two slots of layer 0 save no decode misses, only prefill traffic.
  assert clipped.width.tolist() == [2, 1]
  assert clipped.value_per_byte[1] > clipped.value_per_byte[0]


def test_slot_unit_value_is_the_simulators_time_saved():
  w = make_workload(CLIFF, prompt=8, output=9)
  caps, kv = np.array([2, 3]), w.floor_blocks
  units = marginal.slot_units(w, caps, kv)
  for layer in range(2):
    after = caps.copy()
    after[layer] += units.width[layer]
    before_s = throughput.per_token_seconds(w, caps, kv)[0]
    after_s = throughput.per_token_seconds(w, after, kv)[0]
    saved = units.value_per_byte[layer] * units.width[layer] * (
        w.expert_bytes)
    assert saved == pytest.approx(before_s - after_s, rel=1e-9)


def test_kv_value_is_a_step_curve():
  lengths = dict(prompt=np.arange(4, 36, 2), output=np.arange(20, 4, -1))
  w = make_workload(np.tile(np.array(CLIFF), (2, 1, 1)), concurrency=2,
                    **lengths)
  longest = -(-w.max_len // w.block_size)
  grid = np.arange(w.floor_blocks, 2 * longest + 8)
  values = marginal.kv_value_curve(w, [4, 4], grid, blocks=1)
  assert np.all(values >= 0)
  assert np.all(values[grid >= 2 * longest] == 0)  # above the demand
  # Between one and two requests' worth a block buys admission/less
  # preemption.
  below = (grid >= 2 * w.held_blocks) & (grid < w.demand_blocks(2))
  assert below.any() and np.all(values[below] > 0)


def test_kv_value_matches_predictions():
  w = make_workload(np.tile(np.array(CLIFF), (3, 1, 1)), concurrency=3,
                    prompt=np.arange(4, 36, 2), output=np.arange(20, 4, -1))
  unit = marginal.kv_unit_blocks(w)
  assert unit == int(np.ceil(w.held_blocks))
  kv = w.floor_blocks
  value = marginal.kv_value(w, [3, 3], kv)
  rate = lambda k: throughput.predict(w, throughput.Split.make([3, 3], k, 2))
  assert value * unit * w.block_bytes == pytest.approx(
      1 / rate(kv) - 1 / rate(kv + unit), rel=1e-9)
  assert value > 0


def test_removal_loss_is_infinite_at_top_k():
  w = make_workload(CLIFF)
  loss = marginal.slot_removal_losses(w, [2, 4], w.floor_blocks)
  assert np.isinf(loss[0]) and 0 < loss[1] < np.inf
