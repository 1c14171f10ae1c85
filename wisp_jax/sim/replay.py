"""Trace replay: the pager's own planning code run over a routing trace.

`replay` feeds the needed sets of a `RoutingTrace` through
`wisp_jax.paging.pager.page_layer` with no weights (`on_chunk=None`): one
jitted `lax.scan` over steps, every layer at once (`jax.vmap` over the layer
axis of the layer states and needed masks). The hit, miss and load counts
are therefore the live pager's by construction (DESIGN.md: one
implementation of each policy).

What a step is (`batching`):
  "trace"   the trace's own forward steps: a layer needs the union of the
            experts its tokens routed to in that step (as the live pager).
  "single"  one token per step, in event order: single-stream decoding of
            the same token sequence.

The cache carries over from request to request, as in a server: nothing is
reset between requests. Traces written by `traces.trace.from_generate` drop
the prefill's left padding, which the live model does route; replaying such
a trace matches the live pager exactly when no row was padded (prompts of
equal length).

Policies:
  lru, lfu, fifo, ws  online; options (`tau`, `age_every`) as in
                      `wisp_jax.paging.policies`.
  min                 Belady's oracle: each step gets the next-use step of
                      every expert (`next_use_table`).
  pinned              a fixed hot set, misses served transiently. Without a
                      `hot_set`, each layer pins its `capacity` most routed
                      experts over the whole trace (token-level counts,
                      ties to the lower id): an offline choice that sees
                      the future, like MIN. The hot set's first copy counts
                      in `initial_loads` (the live pager counts it too).

Long traces are replayed in chunks of steps (bounded memory); the last chunk
is padded with empty steps, which change no counter.

Shape legend: S steps, N events, L layers, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wisp_jax.paging import pager
from wisp_jax.paging.policies import get_policy, most_used
from wisp_jax.sim import mrc
from wisp_jax.traces.trace import RoutingTrace

Batching = Literal["trace", "single"]
BATCHINGS = ("trace", "single")
# "Never used again" in the next-use table; keys are NEVER - hint, so the
# hint must stay well inside int32.
NEVER_AGAIN = 2**30
# Steps x layers x experts of one chunk's needed masks (bool bytes).
_CHUNK_ELEMENTS = 2**25


@dataclasses.dataclass(frozen=True)
class ReplayResult:
  """Counts of one replay, in experts.

  Attributes:
    policy: the policy's name.
    batching: "trace" or "single".
    capacity: `[L]` int64 slots per layer.
    hits: `[L]` int64 needed experts found resident.
    misses: `[L]` int64 needed experts not resident.
    loads: `[L]` int64 experts copied host -> device, `initial_loads`
      included (>= misses when a step needs more experts than slots).
    initial_loads: `[L]` int64 copies before the first step (the `pinned`
      hot set; 0 otherwise).
    step_hits: `[S, L]` int32 hits of each step.
    step_misses: `[S, L]` int32.
    step_loads: `[S, L]` int32 (without `initial_loads`).
  """
  policy: str
  batching: str
  capacity: np.ndarray
  hits: np.ndarray
  misses: np.ndarray
  loads: np.ndarray
  initial_loads: np.ndarray
  step_hits: np.ndarray
  step_misses: np.ndarray
  step_loads: np.ndarray

  @property
  def num_steps(self) -> int:
    return self.step_hits.shape[0]

  @property
  def references(self) -> np.ndarray:
    """`[L]` int64 needed experts (hits + misses)."""
    return self.hits + self.misses

  @property
  def hit_rate(self) -> float:
    """Hits over references, all layers together (1.0 if none)."""
    total = int(self.references.sum())
    return float(self.hits.sum()) / total if total else 1.0

  @property
  def layer_hit_rate(self) -> np.ndarray:
    """`[L]` float64 per-layer hit rate."""
    return self.hits / np.maximum(self.references, 1)


def step_ordinals(trace: RoutingTrace, batching: Batching = "trace"
                  ) -> np.ndarray:
  """`[N]` int64 replay step of every event (0, 1, ... without gaps)."""
  if batching not in BATCHINGS:
    raise ValueError(f"batching must be one of {BATCHINGS}, got "
                     f"{batching!r}.")
  if batching == "single":
    return np.arange(trace.num_tokens, dtype=np.int64)
  new_step = np.diff(trace.step, prepend=trace.step[:1] - 1) != 0
  return np.cumsum(new_step) - 1


def needed_masks(trace: RoutingTrace, batching: Batching = "trace",
                 start: int = 0, stop: int | None = None,
                 ordinals: np.ndarray | None = None) -> np.ndarray:
  """`[stop - start, L, E]` bool needed sets of replay steps start..stop-1.

  With "trace" batching and the whole range this equals
  `trace.needed_masks()`.

  Args:
    trace: the routing trace.
    batching: "trace" or "single" (see the module docstring).
    start: first replay step.
    stop: one past the last replay step (default: the end; clipped to it).
    ordinals: `step_ordinals(trace, batching)`, if already computed.
  """
  if ordinals is None:
    ordinals = step_ordinals(trace, batching)
  num_steps = int(ordinals[-1]) + 1 if ordinals.size else 0
  stop = num_steps if stop is None else min(stop, num_steps)
  a, b = np.searchsorted(ordinals, [start, stop])
  masks = np.zeros((max(stop - start, 0), trace.num_layers,
                    trace.num_experts), bool)
  layer = np.arange(trace.num_layers)[None, :, None]
  masks[(ordinals[a:b] - start)[:, None, None], layer, trace.ids[a:b]] = True
  return masks


def needed_words(trace: RoutingTrace, ordinals: np.ndarray) -> np.ndarray:
  """`[S, L, W]` uint64 needed sets of the replay steps `ordinals` (from
  `step_ordinals`) as `sim.mrc` bitmasks, built from the ids without the
  `[S, L, E]` masks."""
  words = mrc.words_of_ids(trace.ids, trace.num_experts)  # [N, L, W]
  if ordinals.size and ordinals[-1] + 1 != ordinals.size:  # steps of tokens
    starts = np.flatnonzero(np.diff(ordinals, prepend=-1))
    words = np.bitwise_or.reduceat(words, starts, axis=0)
  return words


def next_use_table(masks: np.ndarray, start: int = 0,
                   next_after: np.ndarray | None = None) -> np.ndarray:
  """Belady's hint: the next step after t at which each expert is needed.

  One backwards pass over the steps, vectorised over layers and experts
  (faster in numpy than `np.minimum.accumulate` along the time axis).

  Args:
    masks: `[S, L, E]` bool needed sets of steps start .. start + S - 1.
    start: step number of `masks[0]`.
    next_after: `[L, E]` first use at or after step start + S (from the
      chunk that follows); default: never.

  Returns:
    `[S, L, E]` int32; `[t, l, e]` = first step u > start + t that needs e
    in layer l, or `NEVER_AGAIN`.
  """
  masks = np.asarray(masks, bool)
  out = np.empty(masks.shape, np.int32)
  upcoming = (np.full(masks.shape[1:], NEVER_AGAIN, np.int32)
              if next_after is None else np.array(next_after, np.int32))
  for t in range(masks.shape[0] - 1, -1, -1):
    out[t] = upcoming
    np.copyto(upcoming, np.int32(start + t), where=masks[t])
  return out


def most_routed(trace: RoutingTrace, capacity: np.ndarray) -> np.ndarray:
  """`[L, max(capacity)]` int32: each layer's `capacity[l]` most routed
  experts (token-level counts, ties to the lower id), -1 padded."""
  counts = np.zeros((trace.num_layers, trace.num_experts), np.int64)
  for layer in range(trace.num_layers):
    counts[layer] = np.bincount(trace.ids[:, layer].ravel(),
                                minlength=trace.num_experts)
  return most_used(counts, capacity)


@functools.lru_cache(maxsize=None)
def _replay_fn(policy_name: str, options: tuple, unroll: int):
  """The jitted scan for one policy: `(layer_states, masks, ticks, hints)`."""
  policy = get_policy(policy_name, **dict(options))

  def one_layer(ls, needed, tick, hint):
    if policy.evicts:
      ls, _ = pager.page_layer(policy, ls, needed, tick, None, None, hint)
    else:
      ls = pager.count_pinned(ls, needed)
    return ls

  every_layer = jax.vmap(one_layer, in_axes=(0, 0, None,
                                             0 if policy.needs_hint else None))

  @functools.partial(jax.jit, donate_argnums=0)
  def run(ls, masks, ticks, hints):
    zero = jnp.zeros_like(ls.hits)

    def body(ls, xs):
      tick, needed, hint = xs
      # Counters restart every step: per-step values, no int32 overflow.
      ls = every_layer(ls.replace(hits=zero, misses=zero, loads=zero),
                       needed, tick, hint)
      return ls, jnp.stack([ls.hits, ls.misses, ls.loads])  # [3, L]

    return jax.lax.scan(body, ls, (ticks, masks, hints), unroll=unroll)

  return policy, run


def _layer_states(state: pager.PagerState) -> pager.LayerState:
  """Every layer's state at once (fields keep their leading `[L]`)."""
  return pager.LayerState(
      slot_of_expert=state.slot_of_expert, expert_in_slot=state.expert_in_slot,
      capacity=state.capacity, policy_state=state.policy_state,
      hits=state.hits, misses=state.misses, loads=state.loads)


def _lru_fast(trace: RoutingTrace, batching: Batching, ordinals: np.ndarray,
              capacities: Sequence[np.ndarray]) -> list[ReplayResult] | None:
  """LRU replays at several `[L]` capacities from one stack-distance pass,
  or None when some step needs more experts than a layer's slots (there
  the planner's overflow groups load more than the misses).

  With every needed set fitting, the pager's LRU cache of capacity c holds
  the c most recently used experts (ties: lower id), i.e. the top c of
  Mattson's LRU stack, and loads only its misses; `tests/sim/replay_test.py`
  checks this against the planner.
  """
  caps = np.stack([np.asarray(c, np.int64) for c in capacities])  # [C, L]
  if ordinals.size and ordinals[-1] + 1 == ordinals.size:  # token steps
    # One token per step: the ids are the needed sets.
    sets = trace.ids
    needed = np.full(sets.shape[:2], sets.shape[2], np.int32)
  else:
    sets = needed_words(trace, ordinals)
    needed = np.bitwise_count(sets).sum(axis=2, dtype=np.int32)  # [S, L]
  if needed.size and np.any(needed.max(axis=0)[None, :] > caps):
    return None
  unique, index = np.unique(caps, return_inverse=True)
  _, hits = mrc.lru_scan(sets, trace.num_experts, unique,
                         histogram=False)  # [S, L, U]
  index = index.reshape(caps.shape)
  layers = np.arange(trace.num_layers)
  results = []
  for cap, idx in zip(caps, index):
    step_hits = hits[:, layers, idx].astype(np.int32)  # [S, L]
    step_misses = (needed - step_hits).astype(np.int32)
    zero = np.zeros(trace.num_layers, np.int64)
    results.append(ReplayResult(
        policy="lru", batching=batching, capacity=cap,
        hits=step_hits.sum(axis=0, dtype=np.int64),
        misses=step_misses.sum(axis=0, dtype=np.int64),
        loads=step_misses.sum(axis=0, dtype=np.int64), initial_loads=zero,
        step_hits=step_hits, step_misses=step_misses,
        step_loads=step_misses.copy()))
  return results


def replay_many(trace: RoutingTrace, policy: str,
                capacities: Sequence[int | Sequence[int]], **kwargs
                ) -> list[ReplayResult]:
  """`replay` at each of `capacities`; LRU shares one stack-distance pass
  across all of them when every step fits (see `replay`'s `fast`)."""
  if policy == "lru" and kwargs.get("fast", True):
    batching = kwargs.get("batching", "trace")
    caps = [pager.check_capacity(c, trace.num_layers, 1, trace.num_experts,
                                 low_why="1",
                                 high_why=f"the trace's {trace.num_experts} "
                                 "experts", high_label=f"E="
                                 f"{trace.num_experts}").astype(np.int64)
            for c in capacities]
    results = _lru_fast(trace, batching, step_ordinals(trace, batching),
                        caps)
    if results is not None:
      return results
  return [replay(trace, policy, c, **kwargs) for c in capacities]


def default_chunk_steps(num_steps: int, num_layers: int,
                        num_experts: int) -> int:
  """Steps per jitted scan call: a power of two (so traces of similar
  length share one compiled scan) with at most 32M mask entries."""
  limit = max(1, _CHUNK_ELEMENTS // (num_layers * num_experts))
  limit = 1 << (limit.bit_length() - 1)
  return min(limit, 1 << max(num_steps - 1, 0).bit_length())


def replay(trace: RoutingTrace, policy: str, capacity: int | Sequence[int],
           *, policy_options: Mapping[str, Any] | None = None,
           hot_set: np.ndarray | None = None, batching: Batching = "trace",
           num_slots: int | None = None, chunk_steps: int | None = None,
           unroll: int = 1, fast: bool = True) -> ReplayResult:
  """Replays `trace` through the pager's planning code.

  Args:
    trace: the routing trace.
    policy: "lru", "lfu", "fifo", "ws", "pinned" or "min".
    capacity: slots per layer, an int or `[L]` ints in [1, E].
    policy_options: e.g. `{"tau": 4}` for ws, `{"age_every": 16}` for lfu.
    hot_set: `[L, S']` experts pinned by `pinned` (-1 for none, S' <=
      capacity); default: each layer's most routed experts of the trace.
    batching: "trace" (the trace's forward steps) or "single" (one token
      per step).
    num_slots: slot rows per layer of the simulated buffer, >= max
      capacity (rows beyond a layer's capacity stay unused; results do not
      depend on it). Default E: every capacity shares one compiled scan per
      policy. Pass the capacity for the fastest replay of one capacity
      (planning compares slots pairwise).
    chunk_steps: steps per jitted scan call (default: a power of two that
      bounds the masks at 32 MiB).
    unroll: `lax.scan` unroll factor.
    fast: for `lru`, when no step needs more experts than a layer's slots
      (single-stream decode, small batches), count with one LRU
      stack-distance pass (`sim.mrc.lru_scan`) instead of planning every
      step: the same hits, misses and loads (tested against the planner),
      much faster. Steps that overflow fall back to the planner.

  Returns:
    the `ReplayResult`.

  Raises:
    ValueError: unknown policy or batching, a capacity outside [1, E], a
      bad hot set, num_slots or chunk_steps.
  """
  if not isinstance(trace, RoutingTrace):
    raise ValueError(f"replay needs a RoutingTrace, got {type(trace)}; load "
                     "one with RoutingTrace.load(path).")
  options = tuple(sorted((policy_options or {}).items()))
  rule, run = _replay_fn(policy, options, int(unroll))  # validates the name
  num_layers, num_experts = trace.num_layers, trace.num_experts
  cap = pager.check_capacity(capacity, num_layers, 1, num_experts,
                             low_why="1",
                             high_why=f"the trace's {num_experts} experts",
                             high_label=f"E={num_experts}").astype(np.int64)
  if chunk_steps is not None and chunk_steps < 1:
    raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}.")
  ordinals = step_ordinals(trace, batching)
  num_steps = int(ordinals[-1]) + 1 if ordinals.size else 0
  if num_slots is None:
    num_slots = num_experts
  if not cap.max() <= num_slots <= num_experts:
    raise ValueError(f"num_slots={num_slots} must lie in [max capacity "
                     f"{cap.max()}, E={num_experts}].")
  if not rule.evicts:
    if hot_set is None:
      hot_set = most_routed(trace, cap)
    hot_set = np.asarray(hot_set, np.int32)
    if hot_set.ndim != 2 or hot_set.shape[0] != num_layers or (
        hot_set.shape[1] > num_slots):
      raise ValueError(f"hot_set must be [L={num_layers}, S'<={num_slots}] "
                       f"expert ids (-1: none), got shape {hot_set.shape}.")
    hot_set = np.pad(hot_set, ((0, 0), (0, num_slots - hot_set.shape[1])),
                     constant_values=-1)
  elif hot_set is not None:
    raise ValueError(f"hot_set is only used by policy 'pinned', not "
                     f"{policy!r}; drop it.")
  if fast and policy == "lru":
    result = _lru_fast(trace, batching, ordinals, [cap])
    if result is not None:
      return result[0]
  state = pager.init_state(rule, num_layers, num_experts, num_slots,
                           cap.astype(np.int32), hot_set)
  initial_loads = ((hot_set >= 0).sum(axis=1).astype(np.int64)
                   if hot_set is not None else np.zeros(num_layers, np.int64))
  ls = _layer_states(state)

  chunk = int(chunk_steps or default_chunk_steps(num_steps, num_layers,
                                                 num_experts))
  starts = list(range(0, num_steps, chunk))
  boundary_next = [None] * len(starts)
  if rule.needs_hint:
    # First use at or after each chunk's end, from the last chunk back.
    after = None
    for i in reversed(range(1, len(starts))):
      masks = needed_masks(trace, batching, starts[i], starts[i] + chunk,
                           ordinals)
      after = np.where(masks[0], starts[i],
                       next_use_table(masks, starts[i], after)[0])
      boundary_next[i - 1] = after.astype(np.int32)
  counts = []
  for i, start in enumerate(starts):
    masks = needed_masks(trace, batching, start, start + chunk, ordinals)
    real = masks.shape[0]
    hints = (next_use_table(masks, start, boundary_next[i])
             if rule.needs_hint else np.zeros((real, 0), np.int32))
    if real < chunk:  # pad with empty steps: no counter changes
      pad = ((0, chunk - real),) + ((0, 0),) * (masks.ndim - 1)
      masks = np.pad(masks, pad)
      hints = np.pad(hints, ((0, chunk - real),) + ((0, 0),) * (hints.ndim - 1),
                     constant_values=NEVER_AGAIN)
    ticks = np.arange(start, start + chunk, dtype=np.int32)
    ls, per_step = run(ls, jax.device_put(masks), jax.device_put(ticks),
                       jax.device_put(hints))
    counts.append(np.asarray(jax.device_get(per_step))[:real])
  per_step = (np.concatenate(counts) if counts
              else np.zeros((0, 3, num_layers), np.int32))  # [S, 3, L]
  totals = per_step.sum(axis=0, dtype=np.int64)
  return ReplayResult(
      policy=policy, batching=batching, capacity=cap, hits=totals[0],
      misses=totals[1], loads=totals[2] + initial_loads,
      initial_loads=initial_loads, step_hits=per_step[:, 0],
      step_misses=per_step[:, 1], step_loads=per_step[:, 2])
