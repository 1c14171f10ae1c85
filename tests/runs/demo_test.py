"""Tests of wisp_jax/runs/demo.py's parsing and budget (the run itself is
smoke-tested from the command line in tests/experiments_test.py)."""

import pytest

from wisp_jax.models import default
from wisp_jax.runs import demo
from wisp_jax.serving.budget import Footprint

GIB = 2**30


def test_parse_slots():
  assert demo.parse_slots("4") == 4 and demo.parse_slots(3) == 3
  assert demo.parse_slots("2,3, 4,4") == (2, 3, 4, 4)
  with pytest.raises(ValueError, match="comma-separated list of ints"):
    demo.parse_slots("2;3")


def test_slots_for_budget_fills_what_dense_and_kv_leave():
  model = default.load_default()
  c = model.config
  f = Footprint.of_model(model, block_size=1)
  kv = 2 * 256 * f.block_bytes
  fixed = f.dense_bytes + kv
  per_slot = c.num_layers * f.expert_bytes  # one more slot in every layer
  assert demo.slots_for_budget(model, fixed + 3 * per_slot, 2, 256) == 3
  assert demo.slots_for_budget(model, fixed + 3 * per_slot - 1, 2, 256) == 2
  assert demo.slots_for_budget(model, 10 * GIB, 2, 256) == c.num_experts
  with pytest.raises(ValueError, match="top_k=2 needs at least"):
    demo.slots_for_budget(model, fixed + per_slot, 2, 256)
