"""Tests of the compressed device tier (`bank.make_tiered_bank`): copies of
the tier's experts are decoded from device memory, the rest come from the
host bank; outputs stay `np.array_equal` to resident for every policy, and
the counters attribute each load to the tier or to PCIe. The generate calls
run under `jax.transfer_guard("disallow")`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.compress import codec
from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving.generate import generate

CONFIG = get_config("tiny")  # L=2, E=6, K=2
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [3, 1]]
NEW_TOKENS = 12
L, E = CONFIG.num_layers, CONFIG.num_experts


@pytest.fixture(scope="module")
def model():
  return MoEModel(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)


@pytest.fixture(scope="module")
def reference(model):
  return generate(model, PROMPTS, NEW_TOKENS, return_logits=True)


def _run(model, bank, policy="lru", slots=2, hot_set=None):
  with jax.transfer_guard("disallow"):
    return generate(model, PROMPTS, NEW_TOKENS, experts="paged",
                    slots_per_layer=slots, policy=policy, bank=bank,
                    hot_set=hot_set, return_logits=True)


def test_tier_layout_and_bytes(model):
  tier = np.array([[4, 1, -1], [0, 5, 2]])
  bank = bank_lib.make_tiered_bank(model.experts.weights(), tier)
  assert bank_lib.is_tiered(bank) and bank_lib.is_compressed(bank)
  row = np.asarray(bank.gate.row)
  assert row[0].tolist() == [-1, 1, -1, -1, 0, -1]
  assert row[1].tolist() == [0, -1, 2, -1, -1, 1]
  raw = bank_lib.make_bank(model.experts.weights())
  # The tier decodes to the chosen experts' stored bits.
  for name in ("gate", "up", "down"):
    got = np.asarray(codec.decode(jax.tree.map(np.asarray,
                                               getattr(bank, name).tier.code)))
    want = np.asarray(getattr(raw, name))
    assert np.array_equal(got[0, 0], want[0, 4])
    assert np.array_equal(got[1, 2], want[1, 2])
  # Host copies move the host code; the tier costs less than raw rows.
  assert bank_lib.bytes_per_expert(bank) == bank_lib.bytes_per_expert(
      bank_lib.make_compressed_bank(model.experts.weights()))
  assert 0 < bank_lib.tier_bytes(bank) < 3 * L * bank_lib.bytes_per_expert(raw)
  plain = bank_lib.make_tiered_bank(model.experts.weights(), tier,
                                    compressed_host=False)
  assert not bank_lib.is_compressed(plain)
  assert bank_lib.bytes_per_expert(plain) == bank_lib.bytes_per_expert(raw)
  assert bank_lib.tier_from_counts(np.array([[1, 5, 5, 0]]), 2).tolist() == [
      [1, 2]]


def test_bad_tiers(model):
  weights = model.experts.weights()
  with pytest.raises(ValueError, match=r"\[L=2, Z\]"):
    bank_lib.make_tiered_bank(weights, np.zeros((3, 2), int))
  with pytest.raises(ValueError, match=r"\[-1, 6\)"):
    bank_lib.make_tiered_bank(weights, np.array([[0, 6], [1, 2]]))
  with pytest.raises(ValueError, match="repeat an expert"):
    bank_lib.make_tiered_bank(weights, np.array([[1, 1], [1, 2]]))
  f32 = MoEModel(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.float32)
  with pytest.raises(ValueError, match="codes bf16"):
    bank_lib.make_tiered_bank(f32.experts.weights(), np.zeros((2, 1), int))
  bank = bank_lib.make_tiered_bank(weights, np.zeros((2, 1), int))
  with pytest.raises(ValueError, match="paged source without prefetch"):
    api.make_source(CONFIG, bank, "transient")
  with pytest.raises(ValueError, match="paged source without prefetch"):
    api.make_source(CONFIG, bank, "paged", 2, prefetch="temporal")


TIER = np.array([[0, 3, 5], [1, 2, -1]])


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "ws", "pinned"])
def test_outputs_equal_resident_for_every_policy(model, reference, policy):
  bank = bank_lib.make_tiered_bank(model.experts.weights(), TIER)
  hot = np.array([[0, 1], [2, 3]]) if policy == "pinned" else None
  out = _run(model, bank, policy, hot_set=hot)
  assert np.array_equal(out.logits, reference.logits)
  assert np.array_equal(out.tokens, reference.tokens)
  s = out.stats
  assert s.tier_loads.sum() > 0
  assert np.all(s.tier_loads <= s.loads)
  assert s.bytes_moved == int((s.loads - s.tier_loads).sum()) * (
      bank_lib.bytes_per_expert(bank))


def test_tier_counts_attribute_every_load(model, reference):
  """With a raw host bank: the tier changes where copies come from, not
  what is resident (hits, misses and loads are the bank's without a
  tier); two disjoint tiers that cover every expert count each load once
  between them, by its expert's tier; the logits stay resident's."""
  assert sorted(np.concatenate([TIER[0], [1, 2, 4]])) == list(range(E))
  weights = model.experts.weights()
  tiered = lambda tier: _run(model, bank_lib.make_tiered_bank(
      weights, tier, compressed_host=False))
  low = tiered(TIER)  # and its complement: every expert in one of them
  high = tiered(np.array([[1, 2, 4, -1], [0, 3, 4, 5]]))
  plain = _run(model, bank_lib.make_bank(weights))
  for out in (low, high):
    assert np.array_equal(out.logits, reference.logits)
    for field in ("hits", "misses", "loads"):
      assert np.array_equal(getattr(out.stats, field),
                            getattr(plain.stats, field)), field
    assert out.stats.bytes_moved < plain.stats.bytes_moved
  assert np.array_equal(low.stats.loads, high.stats.loads)
  assert np.array_equal(low.stats.tier_loads + high.stats.tier_loads,
                        low.stats.loads)
  assert low.stats.tier_loads.any() and high.stats.tier_loads.any()
  raw = bank_lib.bytes_per_expert(bank_lib.make_bank(weights))
  assert low.stats.bytes_moved == int(
      (low.stats.loads - low.stats.tier_loads).sum()) * raw
