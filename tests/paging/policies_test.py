"""Tests of the history-aware policies of wisp_jax/paging/policies.py
(`lrfu`, `lrfu_gate`) against the plain-Python reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wisp_jax.paging import pager
from wisp_jax.paging import policies
from tests.paging import reference


def run_layer(name, steps, num_experts, capacity, gates=None, **options):
  """Per-step (hits, misses) of `page_layer` over set-steps, one layer."""
  policy = policies.get_policy(name, **options)
  state = pager.init_state(policy, 1, num_experts, capacity + 1, capacity)
  ls = pager.layer_state(state, 0)
  needed = np.zeros((len(steps), num_experts), bool)
  mass = np.zeros((len(steps), num_experts), np.int32)
  for t, s in enumerate(steps):
    needed[t, list(s)] = True
    for e, g in (gates[t].items() if gates else ()):
      mass[t, e] = g

  @jax.jit
  def scan(ls, needed, mass):
    def body(ls, xs):
      tick, need, g = xs
      before = (ls.hits, ls.misses)
      ls, _ = pager.page_layer(policy, ls, need, tick, None, None,
                               gates=g if policy.uses_gates else None)
      return ls, (ls.hits - before[0], ls.misses - before[1])
    ticks = jnp.arange(needed.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, ls, (ticks, needed, mass))

  _, (hits, misses) = scan(ls, needed, mass)
  return list(zip(np.asarray(hits).tolist(), np.asarray(misses).tolist()))


def test_lrfu_hand_computed():
  steps = [{0}, {0}, {0}, {1}, {2}, {0}]
  # A long half-life remembers 0's three uses: {2} evicts 1, 0 still hits.
  assert [h for h, _ in run_layer("lrfu", steps, 3, 2, half_life=8)] == [
      0, 1, 1, 0, 0, 1]
  # Half-life 1: 0 decays to 448/1024 by step 4, below 1's 512: as LRU.
  assert [h for h, _ in run_layer("lrfu", steps, 3, 2, half_life=1)] == [
      0, 1, 1, 0, 0, 0]
  assert [h for h, _ in run_layer("lru", steps, 3, 2)] == [0, 1, 1, 0, 0, 0]


def test_lrfu_gate_keeps_the_heavily_weighted_expert():
  steps = [{0, 1}, {2}, {1}]
  units = lambda w: int(round(w * policies.GATE_ONE))
  gates = [{0: units(0.1), 1: units(0.9)}, {2: units(1.0)}, {1: units(1.0)}]
  got = run_layer("lrfu_gate", steps, 3, 2, gates, half_life=4)
  # LRU evicts 1 (equal recency, higher id); the gate mass keeps it.
  assert [h for h, _ in got] == [0, 0, 1]
  assert [h for h, _ in run_layer("lru", steps, 3, 2)] == [0, 0, 0]


def test_gate_mass_takes_the_largest_weight_per_expert():
  ids = jnp.asarray([[0, 2], [2, 1], [0, 2]], jnp.int32)
  weights = jnp.asarray([[0.75, 0.25], [0.5, 0.5], [0.75, 0.25]])
  mass = policies.gate_mass(ids, weights, 4)
  # Expert 0: max(0.75, 0.75); 2: max(0.25, 0.5, 0.25); a repeated token
  # (row 2 = row 0) changes nothing.
  assert np.asarray(mass).tolist() == [768, 512, 512, 0]


@pytest.mark.parametrize("name", ["lrfu", "lrfu_gate"])
@pytest.mark.parametrize("capacity,half_life", [(2, 3.0), (3, 0.7), (5, 40)])
def test_equal_reference_on_random_traces(name, capacity, half_life):
  rng = np.random.default_rng(capacity)
  num_experts = 7
  steps, gates = [], []
  for _ in range(80):
    pool = (rng.choice(num_experts, size=4, replace=False)
            if rng.random() < 0.7 else np.arange(num_experts))
    size = int(rng.integers(1, 6))
    s = set(rng.choice(pool, size=min(size, len(pool)),
                       replace=False).tolist())
    steps.append(s)
    gates.append({e: int(rng.integers(0, 3 * policies.GATE_ONE)) for e in s})
  got = run_layer(name, steps, num_experts, capacity,
                  gates if name == "lrfu_gate" else None, half_life=half_life)
  want = reference.decayed_replay(
      steps, capacity, half_life, gates if name == "lrfu_gate" else None)
  assert got == want


def test_bad_options_and_missing_gates():
  with pytest.raises(ValueError, match="half_life must be > 0"):
    policies.get_policy("lrfu", half_life=0)
  with pytest.raises(ValueError, match="does not take options"):
    policies.get_policy("lrfu_gate", tau=3)
  policy = policies.get_policy("lrfu_gate")
  ls = pager.layer_state(pager.init_state(policy, 1, 4, 2), 0)
  with pytest.raises(ValueError, match="ranks experts by gate weights"):
    pager.page_layer(policy, ls, jnp.asarray([1, 0, 0, 0], bool),
                     jnp.int32(0), None, None)
