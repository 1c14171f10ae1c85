"""Changing the per-layer slot capacities of a live pager (pure, jitted).

The slot buffer `[L, S, ...]` keeps its shape; a layer's capacity `c` says
that only its slots `0 .. c-1` are usable (`PagerState.capacity`, a traced
array, so a resize never recompiles the serving steps). Growing a layer
just raises `c`. Shrinking it to `c'` must empty the slots `c' .. S-1`:

  * the residents most worth keeping (the policy's retention keys at the
    current tick, e.g. LRU's most recently used) survive, up to `c'` of
    them, so every resident that still fits stays resident;
  * survivors already below `c'` stay in their slot; survivors at or above
    `c'` move (a device-to-device copy of their slot rows, in place) into
    the free slots below `c'`, lowest slot first;
  * the other residents are evicted (their rows become empty).

Both tables (`slot_of_expert`, `expert_in_slot`) stay each other's inverse;
policy state and the hit/miss/load counters are unchanged (a move is not a
host transfer). Slot rows are copied bit for bit, so the experts computed
from them, and hence the model's outputs, are the same as before.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wisp_jax.models import moe
from wisp_jax.paging.pager import PagerState, check_capacity, compact
from wisp_jax.paging.policies import get_policy, keep_rank, rank_before


@struct.dataclass
class LayerResize:
  """One layer's plan (all `[S]` arrays index slots).

  Attributes:
    slot_of_expert: `[E]` int32 table after the resize.
    expert_in_slot: `[S]` int32 table after the resize.
    move_src: `[S]` int32 slots whose rows move (first `num_moves` valid).
    move_dst: `[S]` int32 destination of each move.
    num_moves: `[]` int32 rows copied.
    num_evicted: `[]` int32 residents dropped.
  """
  slot_of_expert: jax.Array
  expert_in_slot: jax.Array
  move_src: jax.Array
  move_dst: jax.Array
  num_moves: jax.Array
  num_evicted: jax.Array


def plan_layer(slot_of_expert: jax.Array, expert_in_slot: jax.Array,
               capacity: jax.Array, keep: jax.Array) -> LayerResize:
  """Plans one layer's resize to `capacity` (see the module docstring).

  Args:
    slot_of_expert: `[E]` int32.
    expert_in_slot: `[S]` int32.
    capacity: `[]` int32 new capacity (1 <= capacity <= S).
    keep: `[E]` int32 keep rank, 0 = most worth keeping.

  Returns:
    the plan.
  """
  num_experts = slot_of_expert.shape[0]
  num_slots = expert_in_slot.shape[0]
  slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
  occupant = expert_in_slot
  occupied = occupant >= 0
  # [S] keep rank of each slot's occupant (E for an empty slot).
  rank = jnp.where(occupied, keep[jnp.maximum(occupant, 0)], num_experts)
  # Occupied slots first, most worth keeping first (ties: lower slot).
  order = rank_before((occupied.astype(jnp.int32), -rank))
  survive = occupied & (order < capacity)
  stay = survive & (slot_ids < capacity)
  move = survive & (slot_ids >= capacity)
  free = (slot_ids < capacity) & ~stay
  num_moves = jnp.sum(move, dtype=jnp.int32)
  valid = slot_ids < num_moves
  # There are always enough free slots: survivors <= capacity.
  move_src = jnp.where(valid, compact(move, num_slots, num_slots), num_slots)
  move_dst = jnp.where(valid, compact(free, num_slots, num_slots), num_slots)
  new_expert_in_slot = jnp.where(stay, occupant, -1).at[move_dst].set(
      occupant[jnp.minimum(move_src, num_slots - 1)], mode="drop")
  new_slot_of_expert = jnp.full((num_experts,), -1, jnp.int32).at[
      jnp.where(new_expert_in_slot >= 0, new_expert_in_slot, num_experts)
  ].set(slot_ids, mode="drop")
  return LayerResize(
      slot_of_expert=new_slot_of_expert, expert_in_slot=new_expert_in_slot,
      move_src=move_src, move_dst=move_dst, num_moves=num_moves,
      num_evicted=jnp.sum(occupied, dtype=jnp.int32) - jnp.sum(
          survive, dtype=jnp.int32))


def _move_rows(slots: moe.ExpertWeights, layer, plan: LayerResize
               ) -> moe.ExpertWeights:
  """Copies slot rows `move_src -> move_dst` of `layer`, in place."""

  def body(i, slots):
    def put(w):
      row = jax.lax.dynamic_slice(w, (layer, plan.move_src[i], 0, 0),
                                  (1, 1) + w.shape[2:])
      return jax.lax.dynamic_update_slice(w, row,
                                          (layer, plan.move_dst[i], 0, 0))
    return jax.tree.map(put, slots)

  return jax.lax.fori_loop(0, plan.num_moves, body, slots)


@functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=(0, 1))
def _resize(state: PagerState, slots: moe.ExpertWeights, capacity: jax.Array,
            policy_name: str, policy_options: tuple):
  policy = get_policy(policy_name, **dict(policy_options))
  num_layers, num_experts = state.slot_of_expert.shape
  zeros = jnp.zeros((num_layers,), jnp.int32)

  def one_layer(layer, loop):
    slots, slot_of_expert, expert_in_slot, moved, evicted = loop
    layer_policy = jax.tree.map(lambda x: x[layer], state.policy_state)
    keep = keep_rank(policy.keys(layer_policy, state.tick, None), num_experts)
    plan = plan_layer(slot_of_expert[layer], expert_in_slot[layer],
                      capacity[layer], keep)
    slots = _move_rows(slots, layer, plan)
    return (slots, slot_of_expert.at[layer].set(plan.slot_of_expert),
            expert_in_slot.at[layer].set(plan.expert_in_slot),
            moved.at[layer].set(plan.num_moves),
            evicted.at[layer].set(plan.num_evicted))

  slots, slot_of_expert, expert_in_slot, moved, evicted = jax.lax.fori_loop(
      0, num_layers, one_layer, (slots, state.slot_of_expert,
                                 state.expert_in_slot, zeros, zeros))
  state = state.replace(slot_of_expert=slot_of_expert,
                        expert_in_slot=expert_in_slot, capacity=capacity)
  return state, slots, moved, evicted


def resize(state: PagerState, slots: moe.ExpertWeights, capacity,
           policy: str = "lru", policy_options: tuple | dict = ()
           ) -> tuple[PagerState, moe.ExpertWeights, np.ndarray, np.ndarray]:
  """Sets every layer's capacity; moves or evicts what no longer fits.

  `state` and `slots` are donated (updated in place); use the returned
  ones. Compiles once per (buffer shapes, policy).

  Args:
    state: the pager state (`[L, S]` tables).
    slots: `[L, S, ...]` device slot buffer.
    capacity: new usable slots per layer, int or `[L]` ints in [1, S].
    policy: the pager's policy name (its retention keys pick survivors).
    policy_options: the policy's options.

  Returns:
    the new state and slots, and per layer `[L]` the rows moved and the
    residents evicted.

  Raises:
    ValueError: a capacity outside [1, S] (S = slot rows in the buffer).
  """
  num_layers, num_slots = state.expert_in_slot.shape
  cap = check_capacity(capacity, num_layers, 1, num_slots, low_why="1",
                       high_why=f"the buffer's {num_slots} slot rows")
  if isinstance(policy_options, dict):
    policy_options = tuple(sorted(policy_options.items()))
  device = state.capacity.sharding
  cap = jax.device_put(cap.astype(np.int32), device)
  state, slots, moved, evicted = _resize(state, slots, cap, policy,
                                         tuple(policy_options))
  moved, evicted = jax.device_get((moved, evicted))
  return state, slots, np.asarray(moved), np.asarray(evicted)
