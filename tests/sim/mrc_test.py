"""Tests of wisp_jax/sim/mrc.py."""

import numpy as np
import pytest

from wisp_jax.sim import mrc
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import DECODE, RoutingTrace


def lru_hits_reference(trace: RoutingTrace, capacity: int,
                       per_expert: bool = False) -> np.ndarray:
  """Plain-Python per-layer LRU cache; returns `[L]` hits (`[L, E]` hits
  of each expert with `per_expert`).

  Per step and layer: U = distinct experts the step's tokens need; hits =
  |U & cache|, misses = |U - cache|. Each miss evicts the least recently
  used cached expert not in U, if the cache is full; among experts last
  used in the same step, the higher id is evicted first. If |U| >
  capacity, the cache keeps the `capacity` lowest ids of U after the step.
  """
  hits = np.zeros((trace.num_layers, trace.num_experts), np.int64)
  for layer in range(trace.num_layers):
    cache, last_use = set(), {}
    for t, group in enumerate(trace.steps()):
      needed = sorted(set(group.ids[:, layer].ravel().tolist()))
      for e in needed:
        hits[layer, e] += e in cache
      for e in needed:
        if e in cache:
          continue
        if len(cache) >= capacity:
          victims = [v for v in cache if v not in needed]
          if not victims:
            continue  # transient: loaded for this step only
          cache.remove(min(victims, key=last_use.__getitem__))
        cache.add(e)
      for e in needed:
        last_use[e] = (t, -e)  # larger = kept longer
      if len(needed) > capacity:
        cache = set(needed[:capacity])
  return hits if per_expert else hits.sum(axis=1)


def _one_layer_trace(steps: list[list[list[int]]], num_experts: int
                     ) -> RoutingTrace:
  """One layer; `steps[t]` lists the tokens (each a top-k list) of step t."""
  rows = [(t, token) for t, tokens in enumerate(steps) for token in tokens]
  ids = np.array([token for _, token in rows])[:, None, :]
  return RoutingTrace(step=[t for t, _ in rows], request=np.zeros(len(rows),
                                                                  int),
                      phase=np.full(len(rows), DECODE),
                      position=np.arange(len(rows)), ids=ids,
                      weights=np.ones(ids.shape, np.float32),
                      num_experts=num_experts)


# E=4, K=1; per-step needed sets {0,1}, {1,2}, {0}, {1,3} (two tokens in
# steps 0, 1, 3). Stack (most recent first, lower id first within a step):
#   t0: cold 0, 1               -> [0, 1]
#   t1: 1 at distance 1, 2 cold -> [1, 2, 0]
#   t2: 0 at distance 2         -> [0, 1, 2]
#   t3: 1 at distance 1, 3 cold.
TINY = [[[0], [1]], [[1], [2]], [[0]], [[3], [1]]]


def test_hand_computed_curve():
  curve = mrc.mattson(_one_layer_trace(TINY, 4))
  assert np.array_equal(curve.references, [7])
  assert np.array_equal(curve.cold, [4])
  assert np.array_equal(curve.distance_histogram, [[0, 2, 1, 0]])
  assert np.array_equal(curve.hits, [[0, 0, 2, 3, 3]])
  assert np.array_equal(curve.misses, [[7, 7, 5, 4, 4]])
  assert np.array_equal(curve.hits_at(2), [2])
  assert np.array_equal(curve.hits_at(99), [3])
  assert np.array_equal(curve.misses_at([3]), [4])
  assert curve.num_steps == 4


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 4])
def test_reference_lru_matches_hand_curve(capacity):
  hits = lru_hits_reference(_one_layer_trace(TINY, 4), capacity)
  assert np.array_equal(hits, [[0, 0, 2, 3, 3][capacity]])


def test_overflowing_step_keeps_lowest_ids():
  # Needed sets {0,1,2}, {0,1}, {3}, {0}. Capacity 2: step 0 leaves {0, 1}
  # cached, so step 1 hits both; step 2 evicts 1 (same last use as 0,
  # higher id) for 3; step 3 hits 0. Keeping {1, 2} instead would give 1.
  trace = _one_layer_trace([[[0], [1], [2]], [[1], [0]], [[3]], [[0]]], 4)
  curve = mrc.mattson(trace)
  assert np.array_equal(lru_hits_reference(trace, 2), [3])
  assert np.array_equal(curve.hits_at(2), [3])
  # Distances: t1: 0 -> 0, 1 -> 1; t3: 0 -> 1 (3 above it); 4 cold.
  assert np.array_equal(curve.distance_histogram, [[1, 2, 0, 0]])
  assert np.array_equal(curve.hits[0], [0, 1, 3, 3, 3])


@pytest.mark.parametrize("make", [
    lambda s: synthetic.uniform(3, 7, 2, 4, 12, 2, seed=s),
    lambda s: synthetic.zipf(2, 9, 3, 3, 15, 3, alpha=1.0, seed=s),
    lambda s: synthetic.sticky(2, 8, 2, 2, 20, 1, p_keep=0.7, seed=s),
    lambda s: synthetic.cross_layer(3, 6, 2, 5, 8, 4, seed=s),
    # E = 70: two words per bitmask.
    lambda s: synthetic.zipf(2, 70, 4, 3, 20, 2, alpha=0.6, seed=s),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_mattson_equals_reference_lru_at_every_capacity(make, seed):
  trace = make(seed)
  curve = mrc.mattson(trace)
  for capacity in range(trace.num_experts + 1):
    assert np.array_equal(curve.hits_at(capacity),
                          lru_hits_reference(trace, capacity)), capacity
  assert np.array_equal(curve.references,
                        trace.needed_masks().sum(axis=(0, 2)))
  assert np.array_equal(curve.hits[:, -1],
                        curve.references - curve.cold)


@pytest.mark.parametrize("num_experts", [1, 7, 31, 32, 33, 64, 65, 128])
def test_bitmasks_from_ids_equal_bitmasks_from_masks(num_experts):
  rng = np.random.default_rng(num_experts)
  top_k = min(3, num_experts)
  ids = np.stack([rng.permutation(num_experts)[:top_k]
                  for _ in range(40)]).reshape(10, 4, top_k)
  masks = np.zeros((10, 4, num_experts), bool)
  for s, l, k in np.ndindex(ids.shape):
    masks[s, l, ids[s, l, k]] = True
  words = mrc.words_of_masks(masks)
  assert words.dtype == np.uint64
  assert words.shape == (10, 4, mrc.num_words(num_experts))
  assert np.array_equal(mrc.words_of_ids(ids, num_experts), words)
  # Bit e % 64 of word e // 64 is expert e.
  e = int(ids[3, 2, 0])
  assert words[3, 2, e // 64] >> np.uint64(e % 64) & np.uint64(1) == 1
  assert np.array_equal(np.bitwise_count(words).sum(axis=-1),
                        masks.sum(axis=-1))


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_expert_misses_equal_the_reference_per_expert(capacity):
  trace = synthetic.zipf(2, 9, 3, 3, 15, 3, alpha=1.0, seed=4)
  refs = trace.needed_masks().sum(axis=0)  # [L, E] steps needing e
  want = refs - lru_hits_reference(trace, capacity, per_expert=True)
  got = mrc.expert_misses(trace, capacity)
  assert np.array_equal(got, want)
  assert np.array_equal(got.sum(axis=1),
                        mrc.mattson(trace).misses_at(capacity))
  with pytest.raises(ValueError, match="capacity must lie"):
    mrc.expert_misses(trace, 10)


def test_working_set_sizes_hand_computed():
  trace = _one_layer_trace(TINY, 4)
  sizes = mrc.working_set_sizes(trace, [1, 2, 4, 10])
  # tau=1: mean |U| = 7/4; tau=2: windows {0,1,2}, {0,1,2}, {0,1,3};
  # tau=4 and longer: all four experts.
  assert np.allclose(sizes, [[1.75, 3.0, 4.0, 4.0]])
  with pytest.raises(ValueError, match="tau must be >= 1"):
    mrc.working_set_sizes(trace, [0])


def test_reuse_intervals_hand_computed():
  hist, cold = mrc.reuse_intervals(_one_layer_trace(TINY, 4))
  # 1 reused after 1 step (t0 -> t1); 0 after 2 (t0 -> t2); 1 after 2.
  assert np.array_equal(hist, [[0, 1, 2, 0]])
  assert np.array_equal(cold, [4])


def test_accepts_masks_and_rejects_other_arrays():
  trace = synthetic.uniform(2, 5, 2, 2, 6, 2)
  from_masks = mrc.mattson(trace.needed_masks())
  assert np.array_equal(from_masks.hits, mrc.mattson(trace).hits)
  with pytest.raises(ValueError, match=r"\[S, L, E\] bool"):
    mrc.mattson(np.zeros((3, 5)))
