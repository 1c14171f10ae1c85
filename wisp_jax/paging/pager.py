"""The working-set pager: bookkeeping (pure planning) apart from data movement.

`page_layer` decides, for one layer and one step, which needed experts are
hits, which must be loaded and into which slots, and returns the new slot
tables. It never touches weights: it calls `on_chunk(data, plan)` for every
group of experts it brings in, and the caller copies and computes there
(`wisp_jax.paging.sources`) or does nothing (trace replay in
`wisp_jax.sim`). One implementation of each policy serves both.

Semantics of a step in layer l (needed set U, capacity c):
  * hits = |U ∩ resident|, misses = |U| - hits (counted in experts);
  * if |U| <= c: misses replace the resident experts with the smallest
    retention keys that U does not need (empty slots first);
  * if |U| > c (big batch, prefill): the c experts of U with the largest
    retention keys stay resident at the end of the step; the others are
    served first (already resident ones first), in groups that fit through
    the same slots. Every copy is counted in `loads` (>= misses: the
    overflow's extra traffic).

Prefetch (`prefetch_layer`): between steps, or between layers of a step,
copies a predicted set of experts into a layer's free or evictable slots.
A prefetch never evicts an expert it protects (the current step's needed
set of that layer when known, the predicted set itself, and earlier
prefetches not yet used) and never touches the demand counters: its copies
count in `prefetch_loads`; a prefetched expert that a later step needs
before it is evicted is a hit (as any resident) and counts once in
`useful`; one evicted unused counts in `wasted`. Outputs do not depend on
it (the expert computation reads whatever slot holds the expert).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wisp_jax.paging.policies import Policy, keep_rank as keep_rank_of, rank_before


@struct.dataclass
class PagerState:
  """Residency of every layer's slot cache. All fields are device arrays.

  Attributes:
    slot_of_expert: `[L, E]` int32, slot holding each expert, -1 if none.
    expert_in_slot: `[L, S]` int32, expert held by each slot, -1 if empty.
    capacity: `[L]` int32, usable slots per layer (slots >= capacity are
      never used), so layers may have different capacities inside one
      `[L, S]` buffer.
    policy_state: the policy's pytree, leaves `[L, E]`.
    hits: `[L]` int32 needed experts found resident (cumulative).
    misses: `[L]` int32 needed experts not resident (cumulative).
    loads: `[L]` int32 experts copied host -> device on demand
      (cumulative; prefetch copies are not in it).
    tick: `[]` int32 step counter, +1 per forward pass.
    prefetched: `[L, E]` bool, resident experts brought in by a prefetch
      and not needed since.
    prefetch_loads: `[L]` int32 experts copied by prefetches (cumulative).
    useful: `[L]` int32 prefetched experts needed before eviction.
    wasted: `[L]` int32 prefetched experts evicted unused.
  """
  slot_of_expert: jax.Array
  expert_in_slot: jax.Array
  capacity: jax.Array
  policy_state: Any
  hits: jax.Array
  misses: jax.Array
  loads: jax.Array
  tick: jax.Array
  prefetched: jax.Array | None = None
  prefetch_loads: jax.Array | None = None
  useful: jax.Array | None = None
  wasted: jax.Array | None = None


@struct.dataclass
class LayerState:
  """One layer's slice of `PagerState` (same fields without the `[L]`).

  The prefetch fields may be None (planning without prefetch tracking).
  """
  slot_of_expert: jax.Array
  expert_in_slot: jax.Array
  capacity: jax.Array
  policy_state: Any
  hits: jax.Array
  misses: jax.Array
  loads: jax.Array
  prefetched: jax.Array | None = None
  prefetch_loads: jax.Array | None = None
  useful: jax.Array | None = None
  wasted: jax.Array | None = None


@struct.dataclass
class ChunkPlan:
  """Copies planned for one group of experts.

  Attributes:
    chunk: `[E]` bool, the experts served by this group.
    load_expert: `[S]` int32, experts to copy (first `num_loads` valid).
    load_slot: `[S]` int32, destination slot of each copy.
    num_loads: `[]` int32.
    slot_of_expert: `[E]` int32 table after the copies.
  """
  chunk: jax.Array
  load_expert: jax.Array
  load_slot: jax.Array
  num_loads: jax.Array
  slot_of_expert: jax.Array


def check_capacity(capacity, num_layers: int, low: int, high: int, *,
                   low_why: str, high_why: str, low_label: str = "",
                   high_label: str = "",
                   error: type[Exception] = ValueError) -> np.ndarray:
  """Slots per layer, checked: the one validation of a capacity.

  Args:
    capacity: an int (every layer) or `L` ints.
    num_layers: L.
    low: fewest slots a layer may have.
    high: most slots a layer may have.
    low_why: what `low` is, e.g. "top_k=2: one token's experts would not
      fit" (the message reads "fewer than {low_why}").
    high_why: what `high` is, e.g. "its 8 experts".
    low_label: `low` in the message's range, e.g. "top_k=2" (default: the
      number).
    high_label: `high` likewise, e.g. "E=8".
    error: the exception type to raise.

  Returns:
    `[L]` int32 slots per layer.

  Raises:
    error: naming the layer, its value and the bound.
  """
  values = np.asarray(capacity)
  if values.size == 0 or not np.issubdtype(values.dtype, np.integer):
    raise error(f"slots per layer must be integers, got {capacity!r}.")
  if values.ndim > 1 or (values.ndim == 1 and values.size != num_layers):
    raise error(f"slots per layer must be an int or {num_layers} ints (one "
                f"per layer), got {values.size} values: "
                f"{values.ravel().tolist()}.")
  values = np.broadcast_to(values, (num_layers,)).astype(np.int32)
  bounds = (f"capacity must lie in [{low_label or low}, {high_label or high}]"
            f", got {values.tolist()}")
  for layer, slots in enumerate(values.tolist()):
    if slots < low:
      raise error(f"layer {layer} gets {slots} expert slots, fewer than "
                  f"{low_why} ({bounds}). Give every layer at least {low}.")
    if slots > high:
      raise error(f"layer {layer} gets {slots} expert slots, more than "
                  f"{high_why} ({bounds}); use at most {high}.")
  return values


def init_state(policy: Policy, num_layers: int, num_experts: int,
               num_slots: int, capacity=None, hot_set=None) -> PagerState:
  """Empty caches (or, for `pinned`, the hot set already resident).

  Args:
    policy: replacement policy.
    num_layers: L.
    num_experts: E.
    num_slots: S, slots per layer in the buffer.
    capacity: usable slots per layer, int or `[L]`; defaults to S.
    hot_set: `[L, S]` expert ids resident from the start, -1 for an empty
      slot (required for `pinned`, whose slots never change).
  """
  cap = check_capacity(num_slots if capacity is None else capacity,
                       num_layers, 1, num_slots, low_why="1",
                       high_why=f"the buffer's {num_slots} slot rows")
  expert_in_slot = np.full((num_layers, num_slots), -1, np.int32)
  slot_of_expert = np.full((num_layers, num_experts), -1, np.int32)
  if hot_set is not None:
    hot = np.asarray(hot_set, np.int32)
    if hot.shape != (num_layers, num_slots):
      raise ValueError(f"hot_set must have shape {(num_layers, num_slots)} "
                       f"(-1 marks an empty slot), got {hot.shape}.")
    if hot.min() < -1 or hot.max() >= num_experts:
      raise ValueError(f"hot_set ids must be in [0, {num_experts}) or -1.")
    for layer in range(num_layers):
      ids = hot[layer][hot[layer] >= 0]
      if (len(set(ids.tolist())) != ids.size or
          np.any(hot[layer, cap[layer]:] >= 0)):
        raise ValueError(f"hot_set layer {layer} must hold distinct experts "
                         f"in its first {cap[layer]} slots (capacity), got "
                         f"{hot[layer].tolist()}.")
      expert_in_slot[layer] = hot[layer]
      slot_of_expert[layer, ids] = np.flatnonzero(hot[layer] >= 0)
  elif not policy.evicts:
    raise ValueError(f"policy {policy.name!r} needs a hot_set.")
  one_layer = policy.init(num_experts)
  zeros = np.zeros((num_layers,), np.int32)
  return PagerState(
      slot_of_expert=jax.device_put(slot_of_expert),
      expert_in_slot=jax.device_put(expert_in_slot),
      capacity=jax.device_put(cap.copy()),
      policy_state=jax.tree.map(
          lambda x: jax.device_put(np.broadcast_to(
              np.asarray(x), (num_layers,) + x.shape).copy()), one_layer),
      hits=jax.device_put(zeros), misses=jax.device_put(zeros.copy()),
      loads=jax.device_put(zeros.copy()),
      tick=jax.device_put(np.zeros((), np.int32)),
      prefetched=jax.device_put(np.zeros((num_layers, num_experts), bool)),
      prefetch_loads=jax.device_put(zeros.copy()),
      useful=jax.device_put(zeros.copy()),
      wasted=jax.device_put(zeros.copy()))


_PREFETCH_FIELDS = ("prefetched", "prefetch_loads", "useful", "wasted")


def layer_state(state: PagerState, layer) -> LayerState:
  extra = {name: (None if getattr(state, name) is None else
                  getattr(state, name)[layer]) for name in _PREFETCH_FIELDS}
  return LayerState(
      slot_of_expert=state.slot_of_expert[layer],
      expert_in_slot=state.expert_in_slot[layer],
      capacity=state.capacity[layer],
      policy_state=jax.tree.map(lambda x: x[layer], state.policy_state),
      hits=state.hits[layer], misses=state.misses[layer],
      loads=state.loads[layer], **extra)


def set_layer_state(state: PagerState, layer, ls: LayerState) -> PagerState:
  put = lambda full, part: full.at[layer].set(part)
  extra = {name: put(getattr(state, name), getattr(ls, name))
           for name in _PREFETCH_FIELDS
           if getattr(state, name) is not None
           and getattr(ls, name) is not None}
  return state.replace(
      slot_of_expert=put(state.slot_of_expert, ls.slot_of_expert),
      expert_in_slot=put(state.expert_in_slot, ls.expert_in_slot),
      capacity=put(state.capacity, ls.capacity),
      policy_state=jax.tree.map(put, state.policy_state, ls.policy_state),
      hits=put(state.hits, ls.hits), misses=put(state.misses, ls.misses),
      loads=put(state.loads, ls.loads), **extra)


def compact(mask: jax.Array, size: int, fill: int) -> jax.Array:
  """Indices where `mask` `[n]` is True, in order, padded to `size` with
  `fill` (sort-free)."""
  position = jnp.where(mask, jnp.cumsum(mask) - 1, size)
  return jnp.full((size,), fill, jnp.int32).at[position].set(
      jnp.arange(mask.shape[0], dtype=jnp.int32), mode="drop")


def needed_mask(ids: jax.Array, num_experts: int) -> jax.Array:
  """`[E]` bool union of the routed ids `[N, K]` (the step's needed set)."""
  return jnp.zeros((num_experts,), bool).at[ids.reshape(-1)].set(True)


def plan_chunk(slot_of_expert, expert_in_slot, capacity, keep_rank,
               chunk, protect=None) -> tuple[ChunkPlan, jax.Array]:
  """Plans the copies that make every expert of `chunk` resident.

  Pure and weight-free. Victims are never experts of `chunk`; empty usable
  slots go first, then the occupants least worth keeping (largest
  `keep_rank`). `chunk` must hold at most `capacity` experts.

  Args:
    slot_of_expert: `[E]` int32.
    expert_in_slot: `[S]` int32.
    capacity: `[]` int32 usable slots.
    keep_rank: `[E]` int32, 0 = most worth keeping.
    chunk: `[E]` bool experts to make resident.
    protect: `[E]` bool experts that must not be evicted either.

  Returns:
    the plan, and the new `expert_in_slot` `[S]`.
  """
  num_experts = slot_of_expert.shape[0]
  num_slots = expert_in_slot.shape[0]
  slot_ids = jnp.arange(num_slots, dtype=jnp.int32)
  miss = chunk & (slot_of_expert < 0)
  num_loads = jnp.sum(miss, dtype=jnp.int32)
  occupant = expert_in_slot
  occupied = occupant >= 0
  keep = chunk if protect is None else chunk | protect
  protected = occupied & keep[jnp.maximum(occupant, 0)]
  # Eviction priority per slot: higher goes first; -1 never.
  priority = jnp.where(occupied, keep_rank[jnp.maximum(occupant, 0)],
                       num_experts)
  priority = jnp.where(protected | (slot_ids >= capacity), -1, priority)
  # victim_slots[i]: the i-th slot to evict (ties: lower slot first).
  victim_slots = jnp.zeros((num_slots,), jnp.int32).at[
      rank_before((priority,))].set(slot_ids)
  # Missing experts in id order, padded with E (dropped by scatters).
  load_expert = compact(miss, num_slots, num_experts)
  valid = slot_ids < num_loads
  load_slot = jnp.where(valid, victim_slots, num_slots)
  evicted = jnp.where(valid, occupant[jnp.minimum(load_slot, num_slots - 1)],
                      -1)
  new_slot_of_expert = slot_of_expert.at[
      jnp.where(evicted >= 0, evicted, num_experts)].set(-1, mode="drop")
  new_slot_of_expert = new_slot_of_expert.at[load_expert].set(
      load_slot, mode="drop")
  new_expert_in_slot = expert_in_slot.at[load_slot].set(load_expert,
                                                        mode="drop")
  plan = ChunkPlan(chunk=chunk, load_expert=load_expert, load_slot=load_slot,
                   num_loads=num_loads, slot_of_expert=new_slot_of_expert)
  return plan, new_expert_in_slot


def page_layer(policy: Policy, ls: LayerState, needed: jax.Array, tick,
               data: Any, on_chunk: Callable[[Any, ChunkPlan], Any] | None,
               hint=None, gates=None) -> tuple[LayerState, Any]:
  """Serves one layer's needed experts for one step (see module docstring).

  Args:
    policy: an evicting policy (not `pinned`).
    ls: the layer's state.
    needed: `[E]` bool experts the step needs.
    tick: `[]` int32 step counter.
    data: the caller's loop state (slots, outputs), passed to `on_chunk`.
    on_chunk: `(data, plan) -> data`, performs a group's copies and
      computes its experts; None to plan only (replay).
    hint: `[E]` next-use steps for `min`.
    gates: `[E]` int32 gate mass of the step (`policies.gate_mass`), for a
      policy that `uses_gates`.

  Returns:
    the new layer state and data.

  Raises:
    ValueError: a policy that uses gate weights got none.
  """
  num_experts = needed.shape[0]
  resident = ls.slot_of_expert >= 0
  hits = jnp.sum(needed & resident, dtype=jnp.int32)
  num_needed = jnp.sum(needed, dtype=jnp.int32)
  if policy.uses_gates:
    if gates is None:
      raise ValueError(
          f"policy {policy.name!r} ranks experts by gate weights, and this "
          "caller passes none; replay it with wisp_jax.sim.prefetch.replay "
          "(which reads the trace's weights) or decode with generate.")
    policy_state = policy.update(ls.policy_state, needed, needed & ~resident,
                                 tick, gates)
  else:
    policy_state = policy.update(ls.policy_state, needed, needed & ~resident,
                                 tick)
  keep_rank = keep_rank_of(policy.keys(policy_state, tick, hint), num_experts)
  # The c needed experts most worth keeping form the final group, served
  # last; the others go first in groups that fit, resident ones first so
  # they are used before anything can evict them.
  cap = ls.capacity
  # Rank among the needed, most worth keeping first: O(E) through the
  # permutation keep_rank (rank_in_needed is only read where needed).
  order = jnp.zeros((num_experts,), jnp.int32).at[keep_rank].set(
      jnp.arange(num_experts, dtype=jnp.int32))  # [E] ids, best first
  rank_in_needed = (jnp.cumsum(needed[order], dtype=jnp.int32) - 1)[keep_rank]
  final = needed & (rank_in_needed < cap)
  early = needed & ~final
  # Resident first, then by keep_rank: a unique composite key in [0, 2E),
  # ranked through an occupancy table.
  composite = jnp.where(resident, 0, num_experts) + keep_rank
  present = jnp.zeros((2 * num_experts,), jnp.int32).at[composite].max(
      early.astype(jnp.int32))
  early_rank = (jnp.cumsum(present) - 1)[composite]
  # Early groups keep the final group's resident experts in place while
  # that leaves them room, so overflow costs as few reloads as possible.
  final_resident = final & resident
  num_final_resident = jnp.sum(final_resident, dtype=jnp.int32)
  spare = num_final_resident < cap
  room = jnp.where(spare, cap - num_final_resident, cap)
  protect = final_resident & spare
  num_early_groups = (jnp.sum(early, dtype=jnp.int32) + room - 1) // room
  # Groups 0 .. num_early_groups-1 are early; group num_early_groups is final.
  group = jnp.where(final, num_early_groups,
                    jnp.where(early, early_rank // room, -1))

  def serve_group(carry):
    g, slot_of_expert, expert_in_slot, loads, data = carry
    # Early groups keep the final group's residents in place (see above).
    keep = protect & (g < num_early_groups)
    plan, expert_in_slot = plan_chunk(slot_of_expert, expert_in_slot, cap,
                                      keep_rank, group == g, keep)
    if on_chunk is not None:
      data = on_chunk(data, plan)
    return (g + 1, plan.slot_of_expert, expert_in_slot,
            loads + plan.num_loads, data)

  # Every group in one loop (usually one trip: the final group alone), so
  # the copies and the expert computation are traced once.
  init = (jnp.zeros((), jnp.int32), ls.slot_of_expert, ls.expert_in_slot,
          jnp.zeros((), jnp.int32), data)
  _, slot_of_expert, expert_in_slot, loads, data = jax.lax.while_loop(
      lambda carry: carry[0] <= num_early_groups, serve_group, init)
  new = ls.replace(slot_of_expert=slot_of_expert,
                   expert_in_slot=expert_in_slot, policy_state=policy_state,
                   hits=ls.hits + hits, misses=ls.misses + num_needed - hits,
                   loads=ls.loads + loads)
  return _track_prefetches(new, ls.prefetched, resident, needed), data


def _track_prefetches(ls: LayerState, prefetched, resident, needed
                      ) -> LayerState:
  """Counts what became of pending prefetches over a demand step.

  A flag on an expert that was no longer resident when the step began (a
  resize evicted it) counts as wasted too.
  """
  if prefetched is None or ls.useful is None:
    return ls
  pending = prefetched & resident
  now_resident = ls.slot_of_expert >= 0
  used = pending & needed
  dropped = (prefetched & ~resident) | (pending & ~needed & ~now_resident)
  return ls.replace(
      prefetched=pending & ~needed & now_resident,
      useful=ls.useful + jnp.sum(used, dtype=jnp.int32),
      wasted=ls.wasted + jnp.sum(dropped, dtype=jnp.int32))


def top_set(scores: jax.Array, size, prefer=None) -> jax.Array:
  """`[E]` bool: the `size` experts with the largest positive `scores`,
  ties to `prefer` (`[E]` bool, e.g. the resident ones) then to the lower
  id. `size` may be traced."""
  keys = (scores,) if prefer is None else (scores, prefer.astype(jnp.int32))
  return (rank_before(keys) < size) & (scores > 0)


def default_prefetch_size(capacity, num_needed):
  """The predicted set per layer and step when none is given: as many
  experts as the layer just needed (`num_needed`, an estimate of what the
  target will need) when that is below `capacity`, else one slot less
  than `capacity`. (A step that needs more experts than slots streams them
  through the slots; a prefetch that filled every slot would be evicted by
  that stream and loaded again.)"""
  capacity = jnp.asarray(capacity, jnp.int32)
  return jnp.where(num_needed < capacity, num_needed,
                   jnp.maximum(capacity - 1, 0))


def prefetch_layer(policy: Policy, ls: LayerState, scores: jax.Array,
                   size, protect: jax.Array, limit, tick, data: Any,
                   on_copy: Callable[[Any, ChunkPlan], Any] | None,
                   hint=None) -> tuple[LayerState, Any]:
  """Copies the predicted experts that are not resident into one layer's
  free or evictable slots (see the module docstring).

  The predicted set is the `size` experts with the largest positive
  `scores` (ties: resident ones, then lower ids). Its missing experts
  are copied, best score first, at most `limit` of them and at most as
  many as there are slots to take. Victims follow the policy's eviction
  order (empty slots first), never an expert of the predicted set, of
  `protect` or a pending prefetch. The policy state is not updated (a
  prefetch is not a reference).

  Args:
    policy: an evicting policy.
    ls: the layer's state (with prefetch fields).
    scores: `[E]` int32 prediction scores (0: not predicted).
    size: `[]` int32 size of the predicted set (may be traced).
    protect: `[E]` bool experts that must stay (e.g. needed this step).
    limit: `[]` int32 most copies (may be traced; 0 does nothing).
    tick: `[]` int32 step counter (for the policy's keys).
    data: the caller's state, passed to `on_copy`.
    on_copy: `(data, plan) -> data`, performs the copies; None to plan only.
    hint: `[E]` next-use steps for `min` (first use at or after now).

  Returns:
    the new layer state and data.
  """
  num_experts = scores.shape[0]
  num_slots = ls.expert_in_slot.shape[0]
  resident = ls.slot_of_expert >= 0
  predicted = top_set(scores, size, resident)
  pending = ls.prefetched & resident
  keep = predicted | protect | pending
  occupant = ls.expert_in_slot
  usable = jnp.arange(num_slots) < ls.capacity
  takeable = usable & ((occupant < 0) | ~keep[jnp.maximum(occupant, 0)])
  room = jnp.minimum(jnp.sum(takeable, dtype=jnp.int32),
                     jnp.asarray(limit, jnp.int32))
  missing = predicted & ~resident
  chunk = missing & (rank_before((missing.astype(jnp.int32), scores)) < room)
  keep_rank = keep_rank_of(policy.keys(ls.policy_state, tick, hint),
                           num_experts)
  plan, expert_in_slot = plan_chunk(ls.slot_of_expert, ls.expert_in_slot,
                                    ls.capacity, keep_rank, chunk, keep)
  if on_copy is not None:
    data = on_copy(data, plan)
  new = ls.replace(slot_of_expert=plan.slot_of_expert,
                   expert_in_slot=expert_in_slot,
                   prefetched=pending | chunk,
                   prefetch_loads=ls.prefetch_loads + plan.num_loads)
  return new, data


def count_pinned(ls: LayerState, needed: jax.Array) -> LayerState:
  """Counts a `pinned` step: hits stay, every miss is one transient load."""
  resident = ls.slot_of_expert >= 0
  hits = jnp.sum(needed & resident, dtype=jnp.int32)
  misses = jnp.sum(needed & ~resident, dtype=jnp.int32)
  return ls.replace(hits=ls.hits + hits, misses=ls.misses + misses,
                    loads=ls.loads + misses)
