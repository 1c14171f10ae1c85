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
  # One request at a time (C=1) of 8 prompt + 9 output tokens: one prefill
  # (which samples the first token) and 8 decode passes per request, so
  # 1/8 prefill and 9/8 tokens per step. Decodes read positions 9..16,
  # mean 12.5 (priced at 12); after decodes 1..7 it holds ceil((8+i)/4)
  # blocks, and the last decode frees them: 24 / 8 = 3 blocks per step.
  # Hand-made curves have no prefill data: a prompt routes uniformly and
  # a layer with c slots holds a fraction c / E of its experts.
  w = make_workload(MISSES, prompt=8, output=9)
  split = throughput.Split.make([3, 4], w.floor_blocks, 2)
  model = w.model
  decode = cost.step_cost(model, TOY_DEVICE, batch=1, context_len=12,
                          misses=0, needed_experts=8)
  union = float(union_size(6, 2, 8))
  prefill_base = cost.step_cost(model, TOY_DEVICE, batch=1, context_len=8,
                                phase="prefill", misses=0,
                                needed_experts=round(2 * union)).total_s
  tau = model.expert_bytes() / TOY_DEVICE["h2d_bytes_per_s"]
  prefill_loads = union * ((1 - 3 / 6) + (1 - 4 / 6))
  step = decode.total_s + prefill_base / 8 + tau * (4 + prefill_loads / 8)
  got = throughput.prediction(w, split)
  assert got.concurrency == 1 and got.batch == 1.0
  assert got.decode_misses_per_step == 4
  assert got.prefills_per_step == pytest.approx(1 / 8)
  assert got.prefill_loads_per_prefill == pytest.approx(prefill_loads)
  assert got.kv_blocks_in_use == pytest.approx(3.0)
  assert got.preemptions_per_step == 0.0
  assert got.decode_step_s == pytest.approx(decode.total_s + 4 * tau)
  assert got.tokens_per_s == pytest.approx((9 / 8) / step, rel=1e-12)


def test_tight_pool_lowers_the_batch_and_preempts():
  # C=4 requests of 28..43 tokens (at most 11 blocks, about 7 held on
  # average); a pool of 16 blocks holds about two of them: the KV model
  # runs fewer than 4 and preempts; with 4 x 11 blocks it never binds.
  w = make_workload(MISSES, concurrency=4, prompt=np.arange(4, 36, 2),
                    output=np.arange(24, 8, -1))
  longest = -(-(w.prompt_lens + w.output_lens - 1).max() // w.block_size)
  tight = throughput.prediction(w, throughput.Split.make(4, 16, 2),
                                max_batch=4, fixed=True)
  roomy = throughput.prediction(
      w, throughput.Split.make(4, 4 * longest, 2), max_batch=4, fixed=True)
  assert roomy.batch == 4.0 and roomy.preemptions_per_step == 0.0
  assert tight.batch < 3 and tight.preemptions_per_step > 0
  assert tight.kv_blocks_in_use <= 16
  assert tight.tokens_per_s < roomy.tokens_per_s


def test_recompute_prefills_are_priced_by_their_own_curve():
  w = make_workload(MISSES, concurrency=4, prompt=np.arange(4, 36, 2),
                    output=np.arange(24, 8, -1))
  split = throughput.Split.make(4, 16, 2)
  op = throughput.operating_point(w, 4, 16)
  new, again = float(op["new_prefills"]), float(op["recompute_prefills"])
  assert again > 0  # the tight pool preempts
  t = throughput.tables(w)
  # Hand-made curves carry no routing to re-admit: a recompute is priced
  # as a new prefill.
  assert np.array_equal(t.curves["recompute_loads"], t.curves["prefill_loads"])
  before = throughput.prediction(w, split, max_batch=4, fixed=True)
  t.curves["recompute_loads"] = np.zeros_like(t.curves["prefill_loads"])
  free = throughput.prediction(w, split, max_batch=4, fixed=True)
  assert free.prefill_loads_per_prefill == pytest.approx(
      before.prefill_loads_per_prefill * new / (new + again))
  assert free.step_seconds == pytest.approx(
      before.step_seconds - t.tau * again * before.prefill_loads_per_prefill)


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
