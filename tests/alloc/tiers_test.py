"""Tests of wisp_jax/alloc/tiers.py: the three-way split (raw slots, a
compressed device tier, KV) and the per-expert counts it reads."""

import itertools

import numpy as np
import pytest

from wisp_jax.alloc import baselines
from wisp_jax.alloc import curves as curves_lib
from wisp_jax.alloc import steady
from wisp_jax.alloc import throughput
from wisp_jax.alloc import tiers
from wisp_jax.alloc.split import BudgetError, Split
from wisp_jax.alloc.workload import Workload
from wisp_jax.models.config import get_config
from tests.alloc.testlib import TOY_DEVICE, make_workload

# The toy device moves 1e6 bytes/s: a decoder at 1e8 is 100x the link (the
# tier pays), at 5e5 half of it (it never pays).
FAST, SLOW = 1e8, 5e5


def traced_workload(seed: int, concurrency: int = 3) -> Workload:
  """A `tiny` (L=2, E=6, K=2) workload whose curves come from a trace."""
  m = get_config("tiny")
  trace = curves_lib.synthetic_trace(
      m.num_layers, m.num_experts, m.top_k,
      [dict(kind="sticky", p_keep=0.7, alpha=1.2),
       dict(kind="zipf", alpha=0.8)], 8, 24, seed)
  rng = np.random.default_rng(seed)
  return Workload(model=m, hardware=TOY_DEVICE,
                  prompt_lens=rng.integers(4, 24, 16),
                  output_lens=rng.integers(4, 24, 16),
                  concurrency=concurrency,
                  curves=curves_lib.curves_from_trace(trace), block_size=4)


def budget_with(w, extra_slots, kv_floors=2):
  return throughput.Budget(
      w.dense_bytes + (w.model.num_layers * w.model.top_k + extra_slots)
      * w.expert_bytes + kv_floors * w.floor_blocks * w.block_bytes)


def exhaustive(w, budget, spec):
  """The best three-way split by brute force: every (c, z) in every layer,
  every byte left over in KV."""
  m = w.model
  pageable = budget.pageable_bytes(w)
  options = [(c, z) for c in range(m.top_k, m.num_experts + 1)
             for z in range(m.num_experts + 1)]
  best = np.inf
  for combo in itertools.product(options, repeat=m.num_layers):
    slots, tier = [c for c, _ in combo], [z for _, z in combo]
    used = sum(slots) * w.expert_bytes + sum(tier) * spec.coded_bytes(w)
    kv = (pageable - used) // w.block_bytes
    if kv >= w.floor_blocks:
      best = min(best, tiers.per_token_seconds(w, spec, slots, tier, kv)[0])
  return 1.0 / best


def test_per_expert_misses_add_up_and_match_a_plain_lru():
  rng = np.random.default_rng(0)
  num_layers, num_experts = 2, 7
  masks = rng.random((60, num_layers, num_experts)) < 0.3
  kinds = rng.integers(0, 2, 60)
  measured = np.arange(60) >= 5
  counts = steady.lru_pass_counts(masks, kinds, measured, per_expert=True)
  for kind, c in enumerate(counts):
    np.testing.assert_allclose(c.expert_misses.sum(axis=1), c.misses)
    # A plain LRU per capacity: the cache is the cap most recently used
    # experts (never-used ones in id order, lowest id most recent).
    for cap in range(num_experts + 1):
      want = np.zeros((num_layers, num_experts))
      for layer in range(num_layers):
        last = {e: -1 for e in range(num_experts)}
        for i in range(masks.shape[0]):
          order = sorted(last, key=lambda e: (-last[e], e))
          cache = set(order[:cap])
          for e in np.flatnonzero(masks[i, layer]).tolist():
            if measured[i] and kinds[i] == kind and e not in cache:
              want[layer, e] += 1
          for e in np.flatnonzero(masks[i, layer]).tolist():
            last[e] = i
      np.testing.assert_array_equal(c.expert_misses[:, :, cap], want)


def test_tier_shares_rise_from_none_to_all():
  w = traced_workload(0)
  shares = tiers.tier_shares(w)
  m = w.model
  assert shares.shape == (w.concurrency, m.num_layers, m.num_experts + 1,
                          m.num_experts + 1)
  assert np.all(np.diff(shares, axis=-1) >= -1e-12)
  np.testing.assert_array_equal(shares[..., 0], 0.0)
  # A tier of every expert takes every miss; with E raw slots none is left.
  misses = shares[..., -1]
  assert np.all((misses == 1.0) | (misses == 0.0))
  np.testing.assert_array_equal(misses[:, :, m.num_experts], 0.0)
  assert np.all(misses[:, :, m.top_k] == 1.0)


def test_hand_made_curves_are_refused_with_the_reason():
  w = make_workload([[4, 4, 3, 2, 1, 0.5, 0], [4, 4, 1, 0.9, 0.8, 0.7, 0]])
  with pytest.raises(ValueError, match="per-request routing"):
    tiers.equimarginal(w, budget_with(w, 2), tiers.TierSpec(1.43, FAST))


@pytest.mark.parametrize("ratio,rate", [(1.0, FAST), (1.43, 0.0)])
def test_spec_refuses_a_codec_that_cannot_code(ratio, rate):
  with pytest.raises(ValueError):
    tiers.TierSpec(ratio, rate)


@pytest.mark.parametrize("seed", range(3))
def test_three_way_split_never_exceeds_the_budget(seed):
  w = traced_workload(seed)
  m = w.model
  for extra in (0, 1, 3, 6, 10):
    budget = budget_with(w, extra)
    for spec in (tiers.TierSpec(1.43, FAST), tiers.TierSpec(1.43, SLOW),
                 tiers.TierSpec(2.0, FAST, compressed_host=True)):
      got = tiers.equimarginal(w, budget, spec)
      slots = np.array(got.split.slots_per_layer)
      tier = np.array(got.tier_per_layer)
      used = (slots.sum() * w.expert_bytes + tier.sum() * spec.coded_bytes(w)
              + got.split.kv_blocks * w.block_bytes)
      assert used <= budget.pageable_bytes(w)
      assert used == sum(v for k, v in got.bytes.items() if k != "pageable")
      assert np.all((slots >= m.top_k) & (slots <= m.num_experts))
      assert np.all((tier >= 0) & (tier <= m.num_experts))
      assert got.split.kv_blocks >= w.floor_blocks
      # The rate is the model's for that split, at its best max batch.
      seconds, n = tiers.per_token_seconds(w, spec, slots, tier,
                                           got.split.kv_blocks)
      assert got.tokens_per_s == pytest.approx(1 / seconds)
      assert got.max_batch == n


def test_validate_refuses_a_split_over_the_budget():
  w = traced_workload(0)
  budget = budget_with(w, 1)
  spec = tiers.TierSpec(1.43, FAST)
  got = tiers.equimarginal(w, budget, spec)
  tiers.validate(w, budget, spec, got.split, got.tier_per_layer)
  over = tuple(z + 1 for z in got.tier_per_layer)
  with pytest.raises(BudgetError, match="three-way split needs"):
    tiers.validate(w, budget, spec, got.split, over)
  with pytest.raises(BudgetError, match="tier sizes"):
    tiers.validate(w, budget, spec, got.split, (0, 7))
  with pytest.raises(BudgetError, match="floor"):
    tiers.validate(w, budget, spec, Split((2, 2), 0), (0, 0))


@pytest.mark.parametrize("seed", range(3))
def test_near_the_exhaustive_optimum(seed):
  w = traced_workload(seed)
  for extra in (1, 3, 6):
    budget = budget_with(w, extra)
    for spec in (tiers.TierSpec(1.43, FAST), tiers.TierSpec(1.43, SLOW),
                 tiers.TierSpec(1.43, 1e7, compressed_host=True)):
      got = tiers.equimarginal(w, budget, spec)
      assert got.tokens_per_s >= 0.99 * exhaustive(w, budget, spec)


def test_a_tier_that_cannot_pay_is_never_bought():
  # Decoding an expert takes longer than copying it raw.
  w = traced_workload(1)
  for extra in (1, 3, 6):
    budget = budget_with(w, extra)
    got = tiers.equimarginal(w, budget, tiers.TierSpec(1.43, SLOW))
    assert got.tier_per_layer == (0, 0)
    two_way = baselines.oracle(w, budget)
    assert got.tokens_per_s >= 0.99 * two_way.tokens_per_s


def test_a_fast_tier_beats_the_two_way_split_where_slots_are_scarce():
  w = traced_workload(0)
  budget = budget_with(w, 1)
  spec = tiers.TierSpec(1.43, FAST)
  got = tiers.equimarginal(w, budget, spec)
  two_way = tiers.equimarginal(w, budget, spec, allow_tier=False)
  assert two_way.tier_per_layer == (0, 0)
  assert sum(got.tier_per_layer) > 0
  assert got.tokens_per_s > 1.02 * two_way.tokens_per_s
  # Without a tier the model is the two-way one, and so is the split's rate.
  assert two_way.tokens_per_s == pytest.approx(
      throughput.predict(w, two_way.split))
