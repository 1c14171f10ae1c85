"""Plain-Python reference replacement policies, written from their
definitions (not from the JAX code), for one layer.

A step needs a set U of experts; the cache holds at most c experts.
hits = |U ∩ cache|, misses = |U \\ cache|. If |U| <= c the cache keeps U
and, when full, evicts the non-needed experts with the smallest retention
key first (ties: the higher id goes first). If |U| > c the cache ends the
step holding the c experts of U with the largest keys (ties: lower id).
"""


def end_of_step(cache, needed, capacity, key):
  """The cache after a step (the module docstring's rule), `key(e)` a
  tuple, larger = more worth keeping."""
  if len(needed) > capacity:
    ranked = sorted(needed, key=lambda e: (tuple(-k for k in key(e)), e))
    return set(ranked[:capacity])
  cache = cache | needed
  while len(cache) > capacity:
    victim = min(cache - needed, key=lambda e: (key(e), -e))
    cache.remove(victim)
  return cache


def replay(policy, steps, capacity, hot_set=(), tau=8, age_every=0):
  """Returns per-step (hits, misses) of `policy` over `steps` (sets)."""
  cache = set(hot_set)
  last_use, loaded_at, count = {}, {}, {}
  out = []
  for tick, needed in enumerate(steps):
    hits = len(needed & cache)
    out.append((hits, len(needed) - hits))
    if policy == "pinned":
      continue
    for e in needed:
      last_use[e] = tick
      count[e] = count.get(e, 0) + 1
      if e not in cache:
        loaded_at[e] = tick
    if age_every and (tick + 1) % age_every == 0:
      count = {e: c // 2 for e, c in count.items()}

    def key(e):
      if policy == "lru":
        return (last_use.get(e, -1),)
      if policy == "fifo":
        return (loaded_at.get(e, -1),)
      if policy == "lfu":
        return (count.get(e, 0), last_use.get(e, -1))
      if policy == "ws":
        lu = last_use.get(e, -1)
        return (int(lu > tick - tau), lu)
      raise ValueError(policy)

    cache = end_of_step(cache, needed, capacity, key)
  return out


def belady(steps, capacity):
  """Belady's MIN over set-steps: evict the non-needed expert whose next
  use is furthest (never used again = furthest; ties: higher id first)."""
  cache, out = set(), []
  for t, needed in enumerate(steps):
    hits = len(needed & cache)
    out.append((hits, len(needed) - hits))

    def next_use(e):
      for u in range(t + 1, len(steps)):
        if e in steps[u]:
          return u
      return len(steps) + 10**6

    if len(needed) > capacity:
      ranked = sorted(needed, key=lambda e: (next_use(e), e))
      cache = set(ranked[:capacity])
      continue
    cache |= needed
    while len(cache) > capacity:
      victim = max(cache - needed, key=lambda e: (next_use(e), e))
      cache.remove(victim)
  return out


def decayed_replay(steps, capacity, half_life, gates=None, one=1024,
                   limit=2**30 - 1):
  """Per-step (hits, misses) of `lrfu` (gates None) or `lrfu_gate`.

  Definition: every step each expert's score is multiplied by
  2^(-1/half_life) (one float32 multiply of the integer score, truncated)
  and each needed expert adds `one` (lrfu) or its gate mass `gates[t][e]`
  (lrfu_gate); scores saturate at `limit`. Retention key: (score, last
  use); eviction and overflow as in `replay`.

  Args:
    steps: list of sets of needed experts.
    capacity: slots.
    half_life: steps.
    gates: per step, a dict expert -> gate mass (lrfu_gate), or None.
  """
  import numpy as np
  factor = np.float32(0.5 ** (1.0 / half_life))
  cache, score, last_use, out = set(), {}, {}, []
  for tick, needed in enumerate(steps):
    hits = len(needed & cache)
    out.append((hits, len(needed) - hits))
    for e in set(score) | needed:
      kept = int(np.float32(score.get(e, 0)) * factor)
      added = 0
      if e in needed:
        added = one if gates is None else max(gates[tick].get(e, 0), 0)
      score[e] = min(kept + min(added, limit), limit)
    for e in needed:
      last_use[e] = tick

    def key(e):
      return (score.get(e, 0), last_use.get(e, -1))

    cache = end_of_step(cache, needed, capacity, key)
  return out
