"""Tests of wisp_jax/sim/timeline.py, hand-computed on a toy model."""

import numpy as np
import pytest

from wisp_jax.sim import cost, timeline
from tests.sim.cost_test import TOY

# Round numbers, no per-step overhead: one expert (192 bytes) takes 192 ns
# on the link.
HW = dict(name="toy-link", h2d_bytes_per_s=1e9, hbm_bytes_per_s=1e10,
          bf16_flops=1e12, memory_bytes=10**6, step_overhead_s=0.0)
NS = 1e-9


def toy_times(steps=1):
  # Decode, batch 1, 10 tokens of KV; each layer computes 2 experts.
  return timeline.device_times(TOY, HW, np.ones(steps), np.full((steps, 2), 2),
                               context_len=10)


def test_device_terms_by_hand():
  t = toy_times()
  # Layer: 72 dense params (144 B) + KV 10 x 8 B = 224 B at 1e10 B/s.
  assert timeline.layer_dense_params(TOY) == 72
  assert t.attention[0].tolist() == pytest.approx([22.4 * NS] * 2)
  # Experts: 2 x 192 B = 38.4 ns (flops 0.384 ns); head 44 x 2 B.
  assert t.experts[0].tolist() == pytest.approx([38.4 * NS] * 2)
  assert t.head[0] == pytest.approx(8.8 * NS)
  assert t.copy_s == pytest.approx(192 * NS)
  # No copies, every term HBM-bound: the step equals cost.step_cost's.
  step = timeline.simulate(t, np.zeros((1, 1, 2)))
  want = cost.step_cost(TOY, HW, batch=1, context_len=10, mode="paged",
                        misses=0, needed_experts=4).total_s
  assert step[0, 0] == pytest.approx(130.4 * NS) == want


def test_demand_and_prefetch_on_one_link():
  t = toy_times()
  demand = np.array([[[1, 1]]])  # a miss in each layer
  # Layer 0: routed at 22.4, its copy lands at 214.4, experts end 252.8;
  # layer 1: routed at 275.2, copy 275.2 -> 467.2, experts end 505.6;
  # head: 514.4 ns.
  assert timeline.simulate(t, demand)[0, 0] == pytest.approx(514.4 * NS)
  # Layer 1's miss prefetched when layer 0 routes: it queues behind layer
  # 0's demand copy (214.4 -> 406.4); layer 1 waits for it and ends 444.8.
  fetched = timeline.simulate(t, np.array([[[1, 0]]]),
                              np.array([[[0, 1]]]), np.array([[[0, 1]]]))
  assert fetched[0, 0] == pytest.approx(453.6 * NS)
  # A wrong prefetch costs link time: layer 1's demand copy waits behind
  # it (406.4 -> 598.4), the step ends at 645.6 ns.
  wrong = timeline.simulate(t, demand, np.array([[[0, 1]]]))
  assert wrong[0, 0] == pytest.approx(645.6 * NS)
  # The bound hides every copy: cost.step_cost(overlap=True) is faster.
  bound = cost.step_cost(TOY, HW, batch=1, context_len=10, misses=2,
                         needed_experts=4, overlap=True).total_s
  assert bound < fetched[0, 0]


def test_next_step_prefetch_lands_during_the_step():
  t = toy_times(steps=2)
  loads = np.array([[[1, 0], [0, 0]]])
  pref = np.array([[[1, 0], [0, 0]]])  # into layer 0, for step 1
  wait = np.array([[[0, 0], [1, 0]]])
  out = timeline.simulate(t, loads, pref, wait, next_step=True)
  # Step 0: layer 0's demand lands at 214.4, the prefetch behind it at
  # 406.4; the step ends at 214.4 + 38.4 + 22.4 + 38.4 + 8.8 = 322.4.
  assert out[0, 0] == pytest.approx(322.4 * NS)
  # Step 1 routes layer 0 at 344.8 and waits for the copy until 406.4:
  # 406.4 + 38.4 + 60.8 + 8.8 - 322.4 = 192 ns.
  assert out[0, 1] == pytest.approx(192.0 * NS)
  assert timeline.tokens_per_s(out, np.ones(2)).tolist() == pytest.approx(
      [2 / (514.4 * NS)])
  with pytest.raises(ValueError, match="device terms"):
    timeline.simulate(t, np.zeros((1, 3, 2)))
