"""Tests of wisp_jax/sim/replay.py: the pager's planning code over traces."""

import numpy as np
import pytest
from flax import nnx

from tests.paging import reference
from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.serving.generate import generate
from wisp_jax.sim import mrc, replay
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import DECODE, RoutingTrace, from_generate

ONLINE = ("lru", "lfu", "fifo", "ws")
# One set of options everywhere, so tests share compiled scans.
OPTIONS = {"lfu": {"age_every": 5}, "ws": {"tau": 3}}


def one_layer_trace(steps: list[list[int]], num_experts: int) -> RoutingTrace:
  """One layer, top-1; `steps[t]` lists the experts of step t's tokens."""
  rows = [(t, e) for t, experts in enumerate(steps) for e in experts]
  return RoutingTrace(
      step=[t for t, _ in rows], request=np.zeros(len(rows), int),
      phase=np.full(len(rows), DECODE), position=np.arange(len(rows)),
      ids=np.array([[[e]] for _, e in rows]),
      weights=np.ones((len(rows), 1, 1), np.float32), num_experts=num_experts)


def random_traces():
  """Small synthetic traces (L=3, E=7, K=2, 24 steps) with different kinds
  of locality."""
  shape = dict(num_layers=3, num_experts=7, top_k=2, num_requests=4,
               tokens_per_request=12)
  return [synthetic.uniform(batch=2, seed=1, **shape),
          synthetic.zipf(batch=2, alpha=1.2, seed=2, **shape),
          synthetic.sticky(batch=3, p_keep=0.7, seed=3, **shape),
          synthetic.cross_layer(batch=2, p_follow=0.8, alpha=0.5, seed=4,
                                **shape)]


# E=4, capacity 2, one token per step: 0 1 0 2 1 0 3 0.
SEQUENCE = [[0], [1], [0], [2], [1], [0], [3], [0]]


@pytest.mark.parametrize("policy, options, want", [
    # LRU: t2 hit 0; t3 evicts 1 (used t1 < t2); t4 evicts 0 (t2 < t3);
    # t5 evicts 2 (t3 < t4); t6 evicts 1 (t4 < t5); t7 hits 0.
    ("lru", {}, [0, 0, 1, 0, 0, 0, 0, 1]),
    # FIFO: t2 hit; t3 evicts 0 (loaded t0) although just used; t4 hits 1;
    # t5 evicts 1 (loaded t1); t6 evicts 2 (loaded t3); t7 hits 0.
    ("fifo", {}, [0, 0, 1, 0, 1, 0, 0, 1]),
    # LFU: counts after t2: 0->2, 1->1. t3 evicts 1; t4 (1 now has 2
    # uses) evicts 2 (1 use); t5 hits 0 (3 uses); t6 evicts 1 (2 < 3);
    # t7 hits 0.
    ("lfu", {}, [0, 0, 1, 0, 0, 1, 0, 1]),
    # WS(tau=2): at a fixed capacity the victim is LRU's (an expert outside
    # the window is older than every expert inside it): same hits as LRU.
    ("ws", {"tau": 2}, [0, 0, 1, 0, 0, 0, 0, 1]),
    # Pinned, no hot_set given: the 2 most routed experts, 0 (4 tokens) and
    # 1 (2 tokens), stay resident; every 0 and 1 hits, 2 and 3 miss.
    ("pinned", {}, [1, 1, 1, 0, 1, 1, 0, 1]),
])
def test_hand_computed_policies(policy, options, want):
  result = replay.replay(one_layer_trace(SEQUENCE, 4), policy, 2,
                         policy_options=options)
  assert result.step_hits[:, 0].tolist() == want
  assert result.step_misses[:, 0].tolist() == [1 - h for h in want]
  assert result.hits.tolist() == [sum(want)]
  assert result.misses.tolist() == [8 - sum(want)]
  # No step needs more than the capacity: every miss is one copy, plus the
  # pinned hot set's first copy.
  initial = 2 if policy == "pinned" else 0
  assert result.initial_loads.tolist() == [initial]
  assert result.loads.tolist() == [8 - sum(want) + initial]


def test_pinned_explicit_hot_set():
  # Hot set {2, 3}: only t3 (2) and t6 (3) hit.
  result = replay.replay(one_layer_trace(SEQUENCE, 4), "pinned", 2,
                         hot_set=[[2, 3]])
  assert result.step_hits[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
  assert result.loads.tolist() == [6 + 2]


def test_min_hand_computed():
  # E=4, capacity 2. Steps {0,1} {2} {0} {1,3} {1}:
  #   t0: 0, 1 cold.                               cache {0, 1}
  #   t1: 2 misses; next use of 0 is t2, of 1 t3: evict 1.  {0, 2}
  #   t2: 0 hits.
  #   t3: 1, 3 miss; 0 and 2 are never used again: both go. {1, 3}
  #   t4: 1 hits.
  steps = [[0, 1], [2], [0], [1, 3], [1]]
  result = replay.replay(one_layer_trace(steps, 4), "min", 2)
  assert result.step_hits[:, 0].tolist() == [0, 0, 1, 0, 1]
  assert result.step_misses[:, 0].tolist() == [2, 1, 0, 2, 0]
  # Cyclic 0 1 2 0 1 2 at capacity 2: LRU never hits; MIN keeps 0 at t2
  # (next use t3 before 1's t4), then at t4 drops 0 (never again) for 1
  # and keeps 2 (t5): hits at t3 and t5.
  cyclic = one_layer_trace([[0], [1], [2], [0], [1], [2]], 4)
  assert replay.replay(cyclic, "min", 2).step_hits[:, 0].tolist() == [
      0, 0, 0, 1, 0, 1]
  assert replay.replay(cyclic, "lru", 2).hits.tolist() == [0]


def test_single_batching_splits_steps_into_tokens():
  # Trace batching: {0,1} {2} {0} {1,3} {1}; single: 0 1 2 0 1 3 1.
  trace = one_layer_trace([[0, 1], [2], [0], [1, 3], [1]], 4)
  # MIN, capacity 2, single stream: t2 evicts 1 (next t4; 0's is t3);
  # t3 hits 0; t4: 0 and 2 are never used again, the higher id 2 goes;
  # t5: 0 never again, 1 next at t6: evict 0; t6 hits 1.
  single = replay.replay(trace, "min", 2, batching="single")
  assert single.num_steps == 7
  assert single.step_hits[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 1]
  np.testing.assert_array_equal(replay.needed_masks(trace, "trace"),
                                trace.needed_masks())
  lru = replay.replay(trace, "lru", 2, batching="single")
  masks = replay.needed_masks(trace, "single")
  assert lru.hits.tolist() == mrc.mattson(masks).hits[:, 2].tolist()


@pytest.mark.parametrize("trace", random_traces(), ids=lambda t: t.source)
def test_lru_equals_mattson_at_every_capacity(trace):
  curve = mrc.mattson(trace)
  for capacity in range(1, trace.num_experts + 1):
    result = replay.replay(trace, "lru", capacity)
    np.testing.assert_array_equal(result.hits, curve.hits[:, capacity],
                                  err_msg=f"capacity {capacity}")
    np.testing.assert_array_equal(result.misses, curve.misses[:, capacity])


def test_lru_equals_mattson_single_stream():
  trace = synthetic.sticky(3, 7, 2, 2, 14, 2, p_keep=0.6, seed=5)
  curve = mrc.mattson(replay.needed_masks(trace, "single"))
  for capacity in (2, 4, 7):
    result = replay.replay(trace, "lru", capacity, batching="single")
    assert result.num_steps == trace.num_tokens
    np.testing.assert_array_equal(result.hits, curve.hits[:, capacity])


def test_min_beats_every_online_policy():
  for trace in random_traces()[:3]:
    for capacity in (2, 3, 5):
      best = replay.replay(trace, "min", capacity).hits
      for policy in ONLINE:
        hits = replay.replay(trace, policy, capacity,
                             policy_options=OPTIONS.get(policy)).hits
        assert np.all(best >= hits), (trace.source, capacity, policy)


@pytest.mark.parametrize("policy", ONLINE + ("pinned", "min"))
def test_equals_reference_per_layer(policy):
  trace = synthetic.sticky(3, 7, 2, 4, 15, 2, p_keep=0.6, alpha=1.0, seed=7)
  options = OPTIONS.get(policy, {})
  capacity = [2, 3, 5]
  result = replay.replay(trace, policy, capacity, policy_options=options)
  masks = trace.needed_masks()
  hot = replay.most_routed(trace, np.asarray(capacity))
  for layer in range(trace.num_layers):
    steps = [set(np.flatnonzero(m).tolist()) for m in masks[:, layer]]
    if policy == "min":
      want = reference.belady(steps, capacity[layer])
    elif policy == "pinned":
      hot_set = hot[layer][hot[layer] >= 0].tolist()
      assert len(hot_set) == capacity[layer]
      want = reference.replay(policy, steps, capacity[layer], hot_set=hot_set)
    else:
      want = reference.replay(policy, steps, capacity[layer], **options)
    assert result.step_hits[:, layer].tolist() == [h for h, _ in want]
    assert result.step_misses[:, layer].tolist() == [m for _, m in want]


@pytest.mark.parametrize("policy", ["lfu", "min"])
def test_chunking_and_buffer_size_do_not_change_results(policy):
  trace = synthetic.sticky(3, 7, 2, 4, 15, 2, p_keep=0.5, seed=8)
  options = OPTIONS.get(policy)
  whole = replay.replay(trace, policy, 3, policy_options=options)
  # 30 steps in chunks of 16: the second chunk is padded, and MIN's hints
  # must see the uses in the chunk after.
  chunked = replay.replay(trace, policy, 3, chunk_steps=16,
                          policy_options=options)
  # A buffer of exactly `capacity` slots instead of E: same counts.
  tight = replay.replay(trace, policy, 3, num_slots=3, policy_options=options)
  for field in ("step_hits", "step_misses", "step_loads"):
    np.testing.assert_array_equal(getattr(whole, field),
                                  getattr(chunked, field))
    np.testing.assert_array_equal(getattr(whole, field), getattr(tight, field))


def test_next_use_table():
  masks = np.zeros((5, 1, 3), bool)
  masks[[0, 2, 3], 0, 0] = True  # expert 0 at steps 0, 2, 3
  masks[1, 0, 1] = True  # expert 1 at step 1 only
  table = replay.next_use_table(masks)
  never = replay.NEVER_AGAIN
  assert table[:, 0, 0].tolist() == [2, 2, 3, never, never]
  assert table[:, 0, 1].tolist() == [1, never, never, never, never]
  assert table[:, 0, 2].tolist() == [never] * 5


def test_replay_matches_live_pager():
  # Equal-length prompts: no left padding, so the recorded trace holds
  # every token the live pager routed (the recorder drops padding).
  model = MoEModel(get_config("tiny"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, model.config.vocab_size, 10) for _ in range(3)]
  options = OPTIONS["lfu"]
  out = generate(model, prompts, 8, experts="paged", slots_per_layer=3,
                 policy="lfu", policy_options=options, record_routing=True)
  trace = from_generate(out, model.config)
  result = replay.replay(trace, "lfu", 3, policy_options=options)
  assert result.num_steps == 8  # prefill + 7 decode steps
  np.testing.assert_array_equal(result.hits, out.stats.hits)
  np.testing.assert_array_equal(result.misses, out.stats.misses)
  np.testing.assert_array_equal(result.loads, out.stats.loads)
  np.testing.assert_array_equal(result.step_loads, out.stats.per_pass_loads)
  np.testing.assert_array_equal(result.step_hits, out.stats.per_pass_hits)
  assert result.loads.sum() > result.misses.sum()  # the prefill overflows


def test_bad_inputs():
  trace = one_layer_trace(SEQUENCE, 4)
  with pytest.raises(ValueError, match=r"capacity must lie in \[1, E=4\]"):
    replay.replay(trace, "lru", 0)
  with pytest.raises(ValueError, match=r"got \[5\]"):
    replay.replay(trace, "lru", 5)
  with pytest.raises(ValueError, match="one per layer"):
    replay.replay(trace, "lru", [2, 2])
  with pytest.raises(ValueError, match="Unknown paging policy 'lfru'"):
    replay.replay(trace, "lfru", 2)
  with pytest.raises(ValueError, match="batching must be one of"):
    replay.replay(trace, "lru", 2, batching="stream")
  with pytest.raises(ValueError, match="only used by policy 'pinned'"):
    replay.replay(trace, "lru", 2, hot_set=[[0, 1]])
  with pytest.raises(ValueError, match="hot_set layer 0"):
    replay.replay(trace, "pinned", 1, hot_set=[[0, 1]])
  with pytest.raises(ValueError, match=r"num_slots=1 must lie in \[max "
                     r"capacity 2, E=4\]"):
    replay.replay(trace, "lru", 2, num_slots=1)
  with pytest.raises(ValueError, match="RoutingTrace"):
    replay.replay(trace.needed_masks(), "lru", 2)


@pytest.mark.parametrize("kind, batch, capacity", [
    ("sticky", 1, 3), ("zipf", 1, 2), ("uniform", 1, 5), ("sticky", 2, 4),
    ("sticky", 4, [5, 6, 4]), ("wide", 1, 40)])
def test_lru_fast_path_equals_the_planner(kind, batch, capacity):
  make = {"sticky": synthetic.sticky, "zipf": synthetic.zipf,
          "uniform": synthetic.uniform,
          # E = 96: two words per needed-set bitmask.
          "wide": lambda *args, **kw: synthetic.sticky(3, 96, 6, 4, 30, 1,
                                                       p_keep=0.6, seed=3),
          }[kind]
  trace = make(3, 6, 2, 4, 10, batch, seed=3)
  batching = "single" if batch == 1 else "trace"
  if batch == 1:  # single-stream: every step fits, the fast path runs
    ordinals = replay.step_ordinals(trace, batching)
    assert replay._lru_fast(trace, batching, ordinals,
                            [np.broadcast_to(capacity, (3,))]) is not None
  slow = replay.replay(trace, "lru", capacity, batching=batching, fast=False)
  fast = replay.replay(trace, "lru", capacity, batching=batching)
  for field in ("hits", "misses", "loads", "step_hits", "step_misses",
                "step_loads"):
    assert np.array_equal(getattr(fast, field), getattr(slow, field)), field
  # Several capacities from one pass; an overflowing one falls back.
  caps = [2, 3, 6] if kind != "wide" else [3, 6, 20, 40]
  many = replay.replay_many(trace, "lru", caps, batching=batching)
  for cap, result in zip(caps, many):
    one = replay.replay(trace, "lru", cap, batching=batching, fast=False)
    assert np.array_equal(result.step_loads, one.step_loads), cap
    assert np.array_equal(result.step_hits, one.step_hits), cap
