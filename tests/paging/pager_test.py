"""Tests of the pager's pure planning (no weights) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wisp_jax.paging import pager
from wisp_jax.paging.policies import get_policy
from tests.paging import reference


def run_layer(policy_name, steps, num_experts, capacity, num_slots=None,
              hot_set=None, **options):
  """Replays set-steps through `page_layer` (one layer, jitted scan)."""
  policy = get_policy(policy_name, **options)
  num_slots = num_slots or capacity
  state = pager.init_state(
      policy, 1, num_experts, num_slots, capacity,
      None if hot_set is None else np.asarray([hot_set], np.int32))
  ls = pager.layer_state(state, 0)
  needed = np.zeros((len(steps), num_experts), bool)
  for t, s in enumerate(steps):
    needed[t, list(s)] = True

  @jax.jit
  def scan(ls, needed):
    def body(ls, xs):
      tick, need = xs
      before = (ls.hits, ls.misses, ls.loads)
      if policy.evicts:
        ls, _ = pager.page_layer(policy, ls, need, tick, None, None)
      else:
        ls = pager.count_pinned(ls, need)
      # Invariants: tables agree; never more residents than capacity.
      ok = jnp.all(jnp.where(
          ls.expert_in_slot >= 0,
          ls.slot_of_expert[jnp.maximum(ls.expert_in_slot, 0)] ==
          jnp.arange(num_slots), True))
      ok &= jnp.sum(ls.slot_of_expert >= 0) <= ls.capacity
      ok &= jnp.sum(ls.slot_of_expert >= 0) == jnp.sum(ls.expert_in_slot >= 0)
      return ls, (ls.hits - before[0], ls.misses - before[1],
                  ls.loads - before[2], ok,
                  ls.slot_of_expert >= 0)
    ticks = jnp.arange(needed.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, ls, (ticks, needed))

  _, (hits, misses, loads, ok, resident) = scan(ls, jnp.asarray(needed))
  assert np.all(np.asarray(ok))
  return (np.asarray(hits), np.asarray(misses), np.asarray(loads),
          np.asarray(resident))


def test_lru_hand_computed():
  # capacity 2; steps: {0,1} {2} {0} {1,3} {3}
  steps = [{0, 1}, {2}, {0}, {1, 3}, {3}]
  hits, misses, loads, resident = run_layer("lru", steps, 4, 2)
  # {0,1} cold; {2} evicts 0 (older tie -> higher id 1? both tick 0: the
  # higher id is less worth keeping, so 1 goes); {0} hit; {1,3} both miss.
  assert hits.tolist() == [0, 0, 1, 0, 1]
  assert misses.tolist() == [2, 1, 0, 2, 0]
  assert np.array_equal(loads, misses)
  assert resident[1].tolist() == [True, False, True, False]
  assert resident[4].tolist() == [False, True, False, True]


def test_fifo_keeps_insertion_order_despite_hits():
  steps = [{0}, {1}, {0}, {2}, {0}]
  hits, misses, _, _ = run_layer("fifo", steps, 3, 2)
  # {2} evicts 0 (loaded first) although 0 was used last: FIFO, not LRU.
  assert hits.tolist() == [0, 0, 1, 0, 0]
  lru_hits, _, _, _ = run_layer("lru", steps, 3, 2)
  assert lru_hits.tolist() == [0, 0, 1, 0, 1]


def test_lfu_keeps_frequent_and_ages():
  steps = [{0}, {0}, {0}, {1}, {2}, {0}]
  hits, _, _, _ = run_layer("lfu", steps, 3, 2)
  # 0 has count 3: {2} evicts 1, so 0 still hits at the end.
  assert hits.tolist() == [0, 1, 1, 0, 0, 1]
  # Halving every step wipes the history: 3 -> 1 -> ... behaves like LRU.
  hits_aged, _, _, _ = run_layer("lfu", steps, 3, 2, age_every=1)
  assert hits_aged.tolist() == [0, 1, 1, 0, 0, 0]


def test_overflow_keeps_lowest_ids_and_counts_extra_loads():
  # capacity 2 and a step needing 4 experts: 0 and 1 stay resident.
  steps = [{1, 2}, {0, 1, 2, 3}, {0, 1}]
  hits, misses, loads, resident = run_layer("lru", steps, 4, 2)
  assert hits.tolist() == [0, 2, 2]
  assert misses.tolist() == [2, 2, 0]
  assert resident[1].tolist() == [True, True, False, False]
  # Step 1 keeps 1 in place while serving {2, 3} through the free slot
  # (2 is a hit, 3 a load), then loads 0: 2 loads == 2 misses.
  assert loads.tolist() == [2, 2, 0]
  # When the kept set already fills every slot, serving 2 evicts 1, which
  # the final group reloads: one miss, two loads.
  hits, misses, loads, _ = run_layer("lru", [{0, 1}, {0, 1, 2}], 3, 2)
  assert misses.tolist() == [2, 1]
  assert loads.tolist() == [2, 2]


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "ws", "pinned"])
@pytest.mark.parametrize("capacity", [2, 3, 6])
def test_policies_equal_reference_on_random_traces(policy, capacity):
  rng = np.random.default_rng(capacity)
  num_experts = 7
  steps = []
  for _ in range(60):
    size = int(rng.integers(1, 5))
    # Some locality so that policies differ.
    pool = rng.choice(num_experts, size=4, replace=False) if rng.random() < 0.7 \
        else np.arange(num_experts)
    steps.append(set(rng.choice(pool, size=min(size, len(pool)),
                                replace=False).tolist()))
  options = {"tau": 3} if policy == "ws" else (
      {"age_every": 5} if policy == "lfu" else {})
  if policy == "pinned":
    hot = list(range(capacity))
    got = run_layer(policy, steps, num_experts, capacity, hot_set=hot)
    want = reference.replay(policy, steps, capacity, hot_set=hot)
  else:
    # A buffer one slot larger than the capacity: the spare slot stays unused.
    got = run_layer(policy, steps, num_experts, capacity,
                    num_slots=capacity + 1, **options)
    want = reference.replay(policy, steps, capacity, **options)
  hits, misses, loads, resident = got
  assert hits.tolist() == [h for h, _ in want]
  assert misses.tolist() == [m for _, m in want]
  assert resident.sum(axis=1).max() <= capacity
  fits = np.array([len(s) <= capacity for s in steps])
  assert np.array_equal(loads[fits], misses[fits])
  assert np.all(loads >= misses)


def test_victims_are_never_needed_now():
  policy = get_policy("lru")
  state = pager.init_state(policy, 1, 6, 3)
  ls = pager.layer_state(state, 0)
  ls, _ = pager.page_layer(policy, ls, jnp.asarray([1, 1, 1, 0, 0, 0], bool),
                           jnp.int32(0), None, None)
  keep_rank = jnp.arange(6, dtype=jnp.int32)
  chunk = jnp.asarray([0, 1, 0, 1, 1, 0], bool)
  plan, expert_in_slot = pager.plan_chunk(ls.slot_of_expert, ls.expert_in_slot,
                                          ls.capacity, keep_rank, chunk)
  resident = set(np.asarray(expert_in_slot).tolist())
  assert {1, 3, 4} <= resident
  assert int(plan.num_loads) == 2
  assert sorted(np.asarray(plan.load_expert)[:2].tolist()) == [3, 4]


def test_init_state_errors():
  lru = get_policy("lru")
  with pytest.raises(ValueError, match="capacity"):
    pager.init_state(lru, 2, 6, 3, capacity=[3, 4])
  with pytest.raises(ValueError, match="hot_set"):
    pager.init_state(get_policy("pinned"), 1, 6, 2)
  with pytest.raises(ValueError, match="distinct experts"):
    pager.init_state(get_policy("pinned"), 1, 6, 2, hot_set=[[1, 1]])
  with pytest.raises(ValueError, match="in its first 1 slots"):
    pager.init_state(get_policy("pinned"), 1, 6, 2, capacity=1,
                     hot_set=[[1, 2]])
  with pytest.raises(ValueError, match="Unknown paging policy 'lfru'"):
    get_policy("lfru")
  with pytest.raises(ValueError, match="does not take options"):
    get_policy("lru", tau=3)
