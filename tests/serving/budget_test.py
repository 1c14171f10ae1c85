"""Tests of wisp_jax/serving/budget.py."""

import jax.numpy as jnp
import pytest

from wisp_jax.models.config import get_config
from wisp_jax.serving.budget import (BudgetError, DeviceBudget, Footprint,
                                     Split)
from wisp_jax.serving.engine import Engine

# tiny (float32): dense params = embed 61x24 + 2 x (norms 2x24 + q 24x30 +
# k, v 24x10 + o 30x24 + router 24x6) + final norm 24 + head 24x61
# = 1464 + 2 x 2112 + 24 + 1464 = 7176 -> 28704 bytes; one expert
# 3 x 24 x 20 = 1440 params -> 5760 bytes; one block of 4 positions:
# K and V x 2 layers x 4 x 1 head x 10 dims x 4 bytes = 640 bytes.
DENSE, EXPERT, BLOCK = 28704, 5760, 640
# max_seq_len 256 at block size 4.
MAX_REQUEST_BLOCKS = 64


def test_footprint_by_hand(tiny_model):
  f = Footprint.of_model(tiny_model, 4)
  assert (f.dense_bytes, f.expert_bytes, f.block_bytes) == (DENSE, EXPERT,
                                                            BLOCK)
  assert f.blocks_per_max_request == MAX_REQUEST_BLOCKS
  # From the config alone, in bf16: half the bytes.
  g = Footprint.of_config(get_config("tiny"), 4, jnp.bfloat16)
  assert (g.dense_bytes, g.expert_bytes, g.block_bytes) == (
      DENSE // 2, EXPERT // 2, BLOCK // 2)


def _budget(tiny_model, total, workspace=1000):
  return DeviceBudget(total, workspace).for_model(tiny_model, 4)


def test_check_accepts_an_exact_fit_and_reports_usage(tiny_model):
  # Per-layer slots may differ: 2 + 5 slots.
  split = Split.make([2, 5], 64, 2)
  total = DENSE + 7 * EXPERT + 64 * BLOCK + 1000
  usage = _budget(tiny_model, total).check(split)
  assert usage == {"dense_bytes": DENSE, "expert_slot_bytes": 7 * EXPERT,
                   "kv_bytes": 64 * BLOCK, "workspace_bytes": 1000,
                   "used_bytes": total, "total_bytes": total}
  assert _budget(tiny_model, total).max_kv_blocks([2, 5]) == 64
  assert _budget(tiny_model, total + BLOCK - 1).max_kv_blocks([2, 5]) == 64
  assert _budget(tiny_model, total + BLOCK).max_kv_blocks([2, 5]) == 65


def test_check_refuses_over_budget_with_the_numbers(tiny_model):
  total = DENSE + 7 * EXPERT + 64 * BLOCK + 1000
  with pytest.raises(BudgetError) as err:
    _budget(tiny_model, total - 1).check(Split.make([2, 5], 64, 2))
  message = str(err.value)
  assert "exceeds the device budget by 1 bytes" in message
  assert f"expert slots 7 x {EXPERT} = {7 * EXPERT}" in message
  assert f"KV 64 x {BLOCK} = {64 * BLOCK}" in message
  assert f"= {total} > total {total - 1}" in message
  assert "at most 63 KV blocks fit" in message


def test_check_refuses_too_few_or_too_many_slots(tiny_model):
  budget = _budget(tiny_model, 10**9)
  with pytest.raises(BudgetError, match="layer 1 gets 1 expert slots, fewer "
                     "than top_k=2"):
    budget.check(Split.make([3, 1], 64, 2))
  with pytest.raises(BudgetError, match="layer 0 gets 7 expert slots, more "
                     "than its 6 experts"):
    budget.check(Split.make(7, 64, 2))
  with pytest.raises(BudgetError, match="slots for 3 layers; the model has 2"):
    budget.check(Split((2, 2, 2), 64))


def test_check_refuses_a_pool_below_one_max_length_request(tiny_model):
  with pytest.raises(BudgetError, match=r"kv_blocks=63 cannot hold one "
                     r"max-length request: max_seq_len=256 at block_size=4 "
                     r"needs 64 blocks \(40960 bytes\)"):
    _budget(tiny_model, 10**9).check(Split.make(2, 63, 2))


def test_engine_checks_its_split_before_any_work(tiny_model):
  budget = DeviceBudget(DENSE + 4 * EXPERT + 64 * BLOCK)
  engine = Engine(tiny_model, budget, slots_per_layer=2, kv_blocks=64,
                  block_size=4, max_batch=2)
  assert engine.budget_usage["used_bytes"] == budget.total_bytes
  with pytest.raises(BudgetError, match="exceeds the device budget by 640"):
    Engine(tiny_model, budget, slots_per_layer=2, kv_blocks=65, block_size=4,
           max_batch=2)
  # The resident source holds every expert: 12 x 5760 bytes.
  with pytest.raises(BudgetError, match="expert slots 12 x 5760"):
    Engine(tiny_model, budget, kv_blocks=64, block_size=4, max_batch=2,
           experts="resident")
  with pytest.raises(BudgetError, match="not bound to a model"):
    DeviceBudget(1000).check(Split.make(2, 64, 2))
  with pytest.raises(BudgetError, match="total_bytes > 0"):
    DeviceBudget(0)
