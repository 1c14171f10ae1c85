"""Replacement policies, optax-style: a small state pytree plus pure functions.

A policy keeps per-expert state for ONE layer (`[E]` arrays; the pager
vmaps over layers) and ranks experts by *retention keys*: a tuple of `[E]`
int32 arrays compared lexicographically, larger = more worth keeping. The
pager evicts the resident expert with the smallest key that the current
step does not need, and when a step needs more experts than there are slots
it keeps the ones with the largest keys. Ties end on expert id: among equal
keys the lower id is kept (this matches the LRU stack order used by the
Mattson miss-ratio curve in `wisp_jax.sim`).

Policies: `lru`, `lfu` (per-expert reference counts halved every
`age_every` steps), `fifo`, `ws` (Denning's working set with window `tau`),
`pinned` (fixed hot set, no eviction) and `min` (Belady's oracle; needs the
next-use hint that only trace replay can provide).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEVER = jnp.iinfo(jnp.int32).max


class Policy(NamedTuple):
  """A replacement policy for one layer.

  Attributes:
    name: registry name.
    init: `num_experts -> state`, a NamedTuple of `[E]` numpy arrays (the
      pager stacks and places them); its class names the fields.
    update: `(state, needed [E] bool, missed [E] bool, tick [] int32) ->
      state`, called once per step with the experts the step needed and
      those that were not resident.
    keys: `(state, tick, hint) -> tuple of [E] int32`, retention keys (larger
      keeps). `hint` is the next-use step `[E]` for `min`, else None.
    evicts: False for `pinned`: the resident set never changes and misses
      are served transiently.
    needs_hint: True for `min`.
  """
  name: str
  init: Callable[[int], Any]
  update: Callable[..., Any]
  keys: Callable[..., tuple]
  evicts: bool = True
  needs_hint: bool = False


class EmptyState(NamedTuple):
  """State of a policy that keeps none (`pinned`, `min`)."""


class LastUseState(NamedTuple):
  """`lru` and `ws`.

  Attributes:
    last_use: `[E]` int32 last step that needed each expert (-1: never).
  """
  last_use: Any


class FifoState(NamedTuple):
  """`fifo`.

  Attributes:
    loaded_at: `[E]` int32 step each expert was last loaded (-1: never).
  """
  loaded_at: Any


class LfuState(NamedTuple):
  """`lfu`.

  Attributes:
    count: `[E]` int32 reference counts (halved every `age_every` steps).
    last_use: `[E]` int32 last step that needed each expert (ties).
  """
  count: Any
  last_use: Any


def _never(num_experts):
  return np.full((num_experts,), -1, np.int32)


def _touch(last_use, needed, tick):
  return jnp.where(needed, tick, last_use)


def _empty_init(num_experts):
  del num_experts
  return EmptyState()


def _unchanged(state, needed, missed, tick):
  del needed, missed, tick
  return state


def lru() -> Policy:
  """Least recently used: keep the most recently needed experts."""

  def update(state, needed, missed, tick):
    del missed
    return LastUseState(_touch(state.last_use, needed, tick))

  return Policy("lru", lambda e: LastUseState(_never(e)), update,
                lambda s, tick, hint: (s.last_use,))


def fifo() -> Policy:
  """First in, first out: keep the most recently *loaded* experts."""

  def update(state, needed, missed, tick):
    del needed
    return FifoState(jnp.where(missed, tick, state.loaded_at))

  return Policy("fifo", lambda e: FifoState(_never(e)), update,
                lambda s, tick, hint: (s.loaded_at,))


def lfu(age_every: int = 0) -> Policy:
  """Least frequently used, ties broken by recency.

  Args:
    age_every: halve every count each `age_every` steps (0: never), so that
      a once-popular expert does not stay forever.
  """
  if age_every < 0:
    raise ValueError(f"lfu age_every must be >= 0, got {age_every}.")

  def init(num_experts):
    return LfuState(np.zeros((num_experts,), np.int32), _never(num_experts))

  def update(state, needed, missed, tick):
    del missed
    count = state.count + needed.astype(jnp.int32)
    if age_every:
      count = jnp.where((tick + 1) % age_every == 0, count >> 1, count)
    return LfuState(count, _touch(state.last_use, needed, tick))

  return Policy("lfu", init, update,
                lambda s, tick, hint: (s.count, s.last_use))


def ws(tau: int = 8) -> Policy:
  """Denning's working set: first evict experts not referenced in the last
  `tau` steps, then the least recently used.

  With a fixed slot count the victim order coincides with LRU's (an expert
  outside the window is also older than every expert inside it); `ws`
  differs in what it reports as the working set and when capacities shrink.
  """
  if tau < 1:
    raise ValueError(f"ws tau must be >= 1, got {tau}.")

  def update(state, needed, missed, tick):
    del missed
    return LastUseState(_touch(state.last_use, needed, tick))

  def keys(state, tick, hint):
    in_window = (state.last_use > tick - tau).astype(jnp.int32)
    return in_window, state.last_use

  return Policy("ws", lambda e: LastUseState(_never(e)), update, keys)


def pinned() -> Policy:
  """A fixed hot set loaded once; misses are served transiently."""
  return Policy("pinned", _empty_init, _unchanged, lambda s, tick, hint: (),
                evicts=False)


def belady_min() -> Policy:
  """Belady's MIN: evict the expert whose next use is furthest away."""

  def keys(state, tick, hint):
    if hint is None:
      raise ValueError("policy 'min' needs the next-use table of a trace; it "
                       "only runs in trace replay, not in live decoding.")
    return (NEVER - hint,)

  return Policy("min", _empty_init, _unchanged, keys, needs_hint=True)


_REGISTRY = {"lru": lru, "lfu": lfu, "fifo": fifo, "ws": ws,
             "pinned": pinned, "min": belady_min}


def get_policy(name: str, **kwargs) -> Policy:
  """Builds the policy `name` with its options (e.g. `tau=4` for ws)."""
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown paging policy {name!r}; known policies: "
                     f"{', '.join(_REGISTRY)}.") from None
  try:
    return factory(**kwargs)
  except TypeError:
    raise ValueError(f"policy {name!r} does not take options {kwargs}.") from None


def most_used(counts: np.ndarray, capacity) -> np.ndarray:
  """A `pinned` hot set: each layer's `capacity[l]` most used experts.

  Args:
    counts: `[L, E]` uses of each expert (e.g. routed tokens).
    capacity: slots per layer, int or `[L]`.

  Returns:
    `[L, max(capacity)]` int32 expert ids, most used first (ties to the
    lower id), -1 past a layer's capacity.
  """
  counts = np.asarray(counts)
  num_layers, num_experts = counts.shape
  cap = np.broadcast_to(np.asarray(capacity), (num_layers,))
  order = np.lexsort((np.broadcast_to(np.arange(num_experts), counts.shape),
                      -counts), axis=-1)
  width = int(cap.max())
  hot = order[:, :width].astype(np.int32)
  hot[np.arange(width)[None, :] >= cap[:, None]] = -1
  return hot


def rank_before(keys: tuple) -> jax.Array:
  """Rank of each item when sorted by `keys` descending, ties by index.

  A sort-free O(n^2) comparison (n = E or S, small): XLA:CPU runs one fused
  kernel instead of a sort per layer per step.

  Args:
    keys: tuple of `[n]` arrays compared lexicographically, first key
      first; larger comes first; equal keys put the lower index first.

  Returns:
    `[n]` int32, 0 for the first item.
  """
  n = keys[0].shape[0] if keys else None
  index = jnp.arange(n, dtype=jnp.int32)
  # before[j, i]: item j comes before item i.
  before = index[:, None] < index[None, :]
  for key in reversed(keys):
    before = (key[:, None] > key[None, :]) | (
        (key[:, None] == key[None, :]) & before)
  return jnp.sum(before, axis=0, dtype=jnp.int32)


def keep_rank(keys: tuple, num_experts: int) -> jax.Array:
  """`[E]` int32 rank of each expert, 0 = most worth keeping; ties keep the
  lower id."""
  if not keys:
    return jnp.arange(num_experts, dtype=jnp.int32)
  return rank_before(keys)
