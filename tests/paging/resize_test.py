"""Tests of wisp_jax/paging/resize.py: shrinking and growing slot capacities."""

import jax
import numpy as np
import pytest

from wisp_jax.models import moe
from wisp_jax.paging import pager
from wisp_jax.paging import resize
from wisp_jax.paging.policies import get_policy

L, E, S = 2, 6, 4


def _state(expert_in_slot, last_use, capacity=S, policy="lru"):
  """A pager state with the given `[L, S]` residents and `[L, E]` last use."""
  state = pager.init_state(get_policy(policy), L, E, S, capacity)
  expert_in_slot = np.asarray(expert_in_slot, np.int32)
  slot_of_expert = np.full((L, E), -1, np.int32)
  for layer in range(L):
    for slot, expert in enumerate(expert_in_slot[layer]):
      if expert >= 0:
        slot_of_expert[layer, expert] = slot
  policy_state = state.policy_state._replace(
      last_use=np.asarray(last_use, np.int32))
  return state.replace(
      slot_of_expert=jax.device_put(slot_of_expert),
      expert_in_slot=jax.device_put(expert_in_slot),
      policy_state=jax.device_put(policy_state),
      tick=jax.device_put(np.asarray(10, np.int32)))


def _slots():
  """`[L, S, ...]` slot rows whose every value names (layer, slot)."""
  def leaf(shape):
    tag = (np.arange(L)[:, None] * 100 + np.arange(S)[None, :]).astype(
        np.float32)
    return jax.device_put(np.broadcast_to(
        tag[:, :, None, None], (L, S) + shape).copy())
  return moe.ExpertWeights(gate=leaf((3, 5)), up=leaf((3, 5)),
                           down=leaf((5, 3)))


def _tables(state):
  return (np.asarray(state.slot_of_expert), np.asarray(state.expert_in_slot),
          np.asarray(state.capacity))


def _check_consistent(state):
  slot_of_expert, expert_in_slot, capacity = _tables(state)
  for layer in range(L):
    for slot, expert in enumerate(expert_in_slot[layer]):
      if expert >= 0:
        assert slot < capacity[layer], (layer, slot)
        assert slot_of_expert[layer, expert] == slot
    for expert, slot in enumerate(slot_of_expert[layer]):
      if slot >= 0:
        assert expert_in_slot[layer, slot] == expert


def _row_tag(slots, layer, slot):
  gate = np.asarray(slots.gate)
  values = np.unique(gate[layer, slot])
  assert values.size == 1
  return int(values[0])


def test_shrink_keeps_what_fits_moves_rows_and_grow_changes_nothing():
  # Layer 0: 3 residents, capacity 4 -> 3: all still fit and stay resident;
  # expert 1 in slot 3 moves to the free slot 1.
  # Layer 1: 4 residents -> 2: keep the two most recently used (4 at tick
  # 7, 0 at tick 5); 0 stays in slot 0, 4 moves from slot 2 to slot 1.
  before = _state([[3, -1, 5, 1], [0, 2, 4, 5]],
                  [[-1, 9, -1, 2, -1, 4], [5, -1, 1, -1, 7, 3]])
  slots = _slots()
  with jax.transfer_guard("disallow"):
    state, slots, moved, evicted = resize.resize(before, slots, [3, 2])
  slot_of_expert, expert_in_slot, capacity = _tables(state)
  assert capacity.tolist() == [3, 2]
  assert expert_in_slot.tolist() == [[3, 1, 5, -1], [0, 4, -1, -1]]
  assert moved.tolist() == [1, 1] and evicted.tolist() == [0, 2]
  _check_consistent(state)
  # Every resident that fits is still resident, with its own weights.
  assert sorted(np.flatnonzero(slot_of_expert[0] >= 0)) == [1, 3, 5]
  assert _row_tag(slots, 0, 1) == 3  # expert 1's row, from slot 3
  assert _row_tag(slots, 0, 0) == 0 and _row_tag(slots, 0, 2) == 2
  assert _row_tag(slots, 1, 1) == 102  # expert 4's row, from slot 2
  assert _row_tag(slots, 1, 0) == 100
  # Counters and policy state are untouched.
  np.testing.assert_array_equal(state.policy_state.last_use,
                                [[-1, 9, -1, 2, -1, 4], [5, -1, 1, -1, 7, 3]])
  assert np.asarray(state.loads).tolist() == [0, 0]

  shrunk = _tables(state)
  with jax.transfer_guard("disallow"):
    grown, slots, moved, evicted = resize.resize(state, slots, 4)
  assert np.asarray(grown.capacity).tolist() == [4, 4]
  np.testing.assert_array_equal(grown.slot_of_expert, shrunk[0])
  np.testing.assert_array_equal(grown.expert_in_slot, shrunk[1])
  assert moved.tolist() == [0, 0] and evicted.tolist() == [0, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_resizes_keep_the_most_recent_residents(seed):
  rng = np.random.default_rng(seed)
  expert_in_slot = np.full((L, S), -1, np.int32)
  last_use = np.full((L, E), -1, np.int32)
  for layer in range(L):
    count = rng.integers(1, S + 1)
    experts = rng.choice(E, count, replace=False)
    expert_in_slot[layer, rng.choice(S, count, replace=False)] = experts
    last_use[layer] = rng.permutation(E)  # distinct: no ties
  state = _state(expert_in_slot, last_use)
  slots = _slots()
  row_of = {(l, e): l * 100 + s for l in range(L)
            for s, e in enumerate(expert_in_slot[l]) if e >= 0}
  capacity = rng.integers(1, S + 1, size=L)
  state, slots, _, evicted = resize.resize(state, slots, capacity)
  _check_consistent(state)
  slot_of_expert = np.asarray(state.slot_of_expert)
  for layer in range(L):
    residents = [e for e in expert_in_slot[layer] if e >= 0]
    kept = sorted(residents, key=lambda e: -last_use[layer, e])[
        :capacity[layer]]
    assert sorted(np.flatnonzero(slot_of_expert[layer] >= 0)) == sorted(kept)
    assert evicted[layer] == len(residents) - len(kept)
    for expert in kept:
      assert _row_tag(slots, layer, slot_of_expert[layer, expert]) == (
          row_of[layer, expert])


def test_bad_capacity_is_refused_with_the_numbers():
  state = _state(np.full((L, S), -1), np.full((L, E), -1))
  with pytest.raises(ValueError, match=r"\[1, 4\].*\[5, 2\]"):
    resize.resize(state, _slots(), [5, 2])
  with pytest.raises(ValueError, match="integers"):
    resize.resize(state, _slots(), 2.5)
