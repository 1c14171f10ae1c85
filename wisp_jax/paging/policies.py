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
`lrfu` (exponentially decayed reference counts, one `half_life` in steps:
LRU as it tends to 0, LFU as it grows), `lrfu_gate` (the same decay over
the gate weight each step gave each expert), `pinned` (fixed hot set,
no eviction) and `min` (Belady's oracle; needs the next-use hint that only
trace replay can provide).

History-aware keys are fixed point int32 (`DECAY_ONE` = one reference or a
gate weight of 1.0) so that every backend ranks experts alike: a decay is
one float32 multiply of the int32 score, truncated (IEEE-exact, so no FMA
contraction can change it), and gate weights are rounded to 1/`GATE_ONE`
before they are combined as integers (order-free).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEVER = jnp.iinfo(jnp.int32).max
# Fixed-point unit of the decayed scores of `lrfu` and `lrfu_gate`: one
# reference (lrfu) or a gate weight of 1.0 (lrfu_gate, at 1/GATE_ONE).
DECAY_ONE = 1024
GATE_ONE = DECAY_ONE
# Decayed scores saturate here (two of them still add inside int32).
SCORE_LIMIT = 2**30 - 1
# Default half-lives in steps: the best mean fraction of the LRU-to-MIN
# hit-rate gap closed over half-lives 1, 2, 4, ..., 256 on the project's
# tuning traces (the shipped model's routing on the first real-text prompts
# and synthetic seed-0 traces; never on the traces the README reports):
#   .venv/bin/python experiments/prefetch.py --config=configs/prefetch.py:tune \
#       --workdir=workdirs/prefetch_tune
# Both pick 32, inside the grid; the mean is nearly flat from 32 up (lrfu
# 23.8% at 32, 23.2% at 256: LFU-like ranking holds on most traces), while
# the phase-changing `shift` traces prefer short half-lives (lrfu 9.3% at 8,
# -0.4% at 256).
LRFU_HALF_LIFE = 32.0
LRFU_GATE_HALF_LIFE = 32.0


class Policy(NamedTuple):
  """A replacement policy for one layer.

  Attributes:
    name: registry name.
    init: `num_experts -> state`, a NamedTuple of `[E]` numpy arrays (the
      pager stacks and places them); its class names the fields.
    update: `(state, needed [E] bool, missed [E] bool, tick [] int32) ->
      state`, called once per step with the experts the step needed and
      those that were not resident. A policy with `uses_gates` takes a
      fifth argument, `gates` `[E]` int32: the gate weight the step gave
      each expert (the largest over its tokens), in units of 1/`GATE_ONE`
      (`gate_mass`).
    keys: `(state, tick, hint) -> tuple of [E] int32`, retention keys (larger
      keeps). `hint` is the next-use step `[E]` for `min`, else None.
    evicts: False for `pinned`: the resident set never changes and misses
      are served transiently.
    needs_hint: True for `min`.
    uses_gates: True when `update` takes the step's gate weights.
  """
  name: str
  init: Callable[[int], Any]
  update: Callable[..., Any]
  keys: Callable[..., tuple]
  evicts: bool = True
  needs_hint: bool = False
  uses_gates: bool = False


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


class DecayState(NamedTuple):
  """`lrfu` and `lrfu_gate`.

  Attributes:
    score: `[E]` int32 decayed reference count (or gate mass), in units of
      1/`DECAY_ONE`.
    last_use: `[E]` int32 last step that needed each expert (ties).
  """
  score: Any
  last_use: Any


def gate_mass(ids: jax.Array, weights: jax.Array, num_experts: int
              ) -> jax.Array:
  """`[E]` int32 the largest gate weight any token of the step gave each
  expert, in units of 1/`GATE_ONE` (0 if none).

  The largest, not the sum: a token repeated in a step (the left-padding
  copies of `generate`) changes nothing, so live and replayed keys agree;
  at batch 1 it is the expert's gate weight. Weights are rounded to
  integers first, so the result does not depend on summation order.

  Args:
    ids: `[N, K]` routed expert ids.
    weights: `[N, K]` gate weights.
    num_experts: E.
  """
  units = jnp.round(weights.astype(jnp.float32) * GATE_ONE).astype(jnp.int32)
  return jnp.zeros((num_experts,), jnp.int32).at[ids.reshape(-1)].max(
      units.reshape(-1))


def _decay_factor(name: str, half_life: float) -> np.float32:
  if not half_life > 0:
    raise ValueError(f"{name} half_life must be > 0 steps, got {half_life}.")
  return np.float32(0.5 ** (1.0 / float(half_life)))


def _decayed(score, factor, added):
  """`score * factor` (truncated) plus `added`, saturating at SCORE_LIMIT."""
  kept = (score.astype(jnp.float32) * factor).astype(jnp.int32)
  return jnp.minimum(kept + jnp.minimum(added, SCORE_LIMIT), SCORE_LIMIT)


def lrfu(half_life: float = LRFU_HALF_LIFE) -> Policy:
  """Least recently/frequently used (LRFU): keep the experts with the
  largest exponentially decayed reference count, ties by recency.

  Every step the scores decay by 2^(-1/half_life) and each needed expert
  adds one; so an expert referenced `half_life` steps ago counts half as
  much as one referenced now. Small half-lives rank like LRU, large ones
  like LFU without aging.

  Args:
    half_life: steps after which a reference weighs half (> 0).
  """
  factor = _decay_factor("lrfu", half_life)

  def init(num_experts):
    return DecayState(np.zeros((num_experts,), np.int32), _never(num_experts))

  def update(state, needed, missed, tick):
    del missed
    added = needed.astype(jnp.int32) * DECAY_ONE
    return DecayState(_decayed(state.score, factor, added),
                      _touch(state.last_use, needed, tick))

  return Policy("lrfu", init, update,
                lambda s, tick, hint: (s.score, s.last_use))


def lrfu_gate(half_life: float = LRFU_GATE_HALF_LIFE) -> Policy:
  """LRFU over gate weights: the retention key is the decayed sum over
  steps of the gate weight each step gave the expert (`gate_mass`), so an
  expert that tokens lean on heavily outlives one picked as a weak K-th
  choice.

  Args:
    half_life: steps after which a step's gate mass weighs half (> 0).
  """
  factor = _decay_factor("lrfu_gate", half_life)

  def init(num_experts):
    return DecayState(np.zeros((num_experts,), np.int32), _never(num_experts))

  def update(state, needed, missed, tick, gates):
    del missed
    added = jnp.where(needed, jnp.maximum(gates, 0), 0).astype(jnp.int32)
    return DecayState(_decayed(state.score, factor, added),
                      _touch(state.last_use, needed, tick))

  return Policy("lrfu_gate", init, update,
                lambda s, tick, hint: (s.score, s.last_use), uses_gates=True)


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
             "lrfu": lrfu, "lrfu_gate": lrfu_gate, "pinned": pinned,
             "min": belady_min}


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
