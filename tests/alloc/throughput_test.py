"""Tests of wisp_jax/alloc/throughput.py (the throughput model)."""

import numpy as np
import pytest

from wisp_jax.alloc import throughput
from wisp_jax.alloc.curves import union_size
from wisp_jax.sim import cost
from tests.alloc.testlib import TOY_DEVICE, make_workload

# Layer 0 and 1 misses per step by capacity 0..6 (integers, for step_cost).
MISSES = [[4, 4, 3, 2, 1, 1, 0], [4, 4, 2, 2, 2, 1, 0]]


def test_prediction_is_cost_model_composition():
  # One request (C=1) of 8 prompt + 9 output tokens: decode context is
  # positions 9..17, mean 13; the pool holds it whole, so no preemption.
  w = make_workload(MISSES, prompt=8, output=9)
  split = throughput.Split.make([3, 4], w.floor_blocks, 2)
  model = w.model
  decode = cost.step_cost(model, TOY_DEVICE, batch=1, context_len=13,
                          misses=2 + 2, needed_experts=8)
  union = float(union_size(6, 2, 8))
  prefill_base = cost.step_cost(model, TOY_DEVICE, batch=1, context_len=8,
                                phase="prefill", misses=0,
                                needed_experts=round(2 * union)).total_s
  tau = model.expert_bytes() / TOY_DEVICE["h2d_bytes_per_s"]
  prefill = prefill_base + tau * union * ((1 - 3 / 6) + (1 - 4 / 6))
  expected = 1.0 / (decode.total_s + prefill / 9)
  got = throughput.prediction(w, split)
  assert got.concurrency == 1
  assert got.decode_misses_per_step == 4
  assert got.decode_step_s == pytest.approx(decode.total_s)
  assert got.full_probability == 0.0
  assert got.tokens_per_s == pytest.approx(expected, rel=1e-12)


def test_full_probability_bounds():
  w = make_workload(MISSES, concurrency=4, prompt=np.arange(4, 36, 2),
                    output=np.arange(20, 4, -1))
  longest = -(-w.max_len // w.block_size)
  p = throughput.full_probability(w, np.array([1, 2, 3]),
                                3 * longest)
  assert np.all(p == 0.0)  # three longest requests fit: never full
  half = throughput.full_probability(w, 2, 2 * w.held_blocks)
  assert float(half) == pytest.approx(0.5)
  assert float(throughput.full_probability(w, 3, 3 * w.held_blocks - 5)) > 0.5


def test_more_kv_never_hurts_and_saturates_at_demand():
  w = make_workload(np.tile(np.array(MISSES, float), (3, 1, 1)) *
                    np.array([1, 1.5, 2])[:, None, None], concurrency=3,
                    prompt=np.arange(4, 36, 2), output=np.arange(20, 4, -1))
  longest = -(-w.max_len // w.block_size)
  rates = [throughput.predict(w, throughput.Split.make(4, kv, 2))
           for kv in range(w.floor_blocks, 3 * longest + 10)]
  assert np.all(np.diff(rates) >= -1e-12)
  assert rates[-1] == rates[-10]  # above 3 longest requests: flat
  assert rates[-1] > 1.3 * rates[0]  # admission pays


def test_budget_check_states_the_numbers():
  w = make_workload(MISSES, prompt=8, output=9)
  need = w.dense_bytes + 100 + 2 * 2 * w.expert_bytes + (
      w.floor_blocks * w.block_bytes)
  throughput.Budget(need, 100).check(w)  # exactly enough
  with pytest.raises(throughput.BudgetError) as error:
    throughput.Budget(need - 1, 100).check(w)
  message = str(error.value)
  for number in (w.dense_bytes, 100, w.floor_blocks * w.block_bytes,
                 2 * 2 * w.expert_bytes, need, need - 1):
    assert str(number) in message


@pytest.mark.parametrize("split, problem", [
    (([1, 3], 100), "top_k"), (([3, 7], 100), "top_k"),
    (([3, 3], 2), "floor"), (([6, 6], 10**6), "pageable")])
def test_validate_refuses_bad_splits(split, problem):
  w = make_workload(MISSES, prompt=8, output=9)
  budget = throughput.Budget(w.dense_bytes + 10**5)
  with pytest.raises(throughput.BudgetError, match=problem):
    budget.validate(w, throughput.Split.make(*split, 2))
