"""Tests of wisp_jax/sim/prefetch.py (replay with prefetch) on hand-built
traces, and of the trace's recorded lookahead."""

import numpy as np
import pytest

from wisp_jax.sim import prefetch as sim_prefetch
from wisp_jax.sim import replay as replay_lib
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import DECODE, RoutingTrace


def hand_trace(steps=9, lookahead=False):
  """L=2, E=6, K=1, one token per step: layer 0 cycles 0, 1, 2 and layer 1
  follows it with e + 3, so two slots under LRU always miss."""
  l0 = np.arange(steps) % 3
  ids = np.stack([l0, l0 + 3], axis=1)[:, :, None]
  look = None
  if lookahead:  # layer 0 predicts layer 1 perfectly from step 2 on
    look = np.full_like(ids, -1)
    look[2:, 0, 0] = ids[2:, 1, 0]
  return RoutingTrace(step=np.arange(steps), request=np.zeros(steps, int),
                      phase=np.full(steps, DECODE), position=np.arange(steps),
                      ids=ids, weights=np.ones(ids.shape, np.float32),
                      num_experts=6, lookahead_ids=look)


def test_cooccur_prefetch_by_hand():
  trace = hand_trace()
  plain = sim_prefetch.replay(trace, "lru", 2)
  assert plain.hits.tolist() == [0, 0] and plain.misses.tolist() == [9, 9]
  r = sim_prefetch.replay(trace, "lru", 2, predictor="cooccur",
                          chunk_steps=4)
  # Steps 0-2 learn 0->3, 1->4, 2->5; from step 3 on, layer 0's expert
  # predicts layer 1's, which is prefetched (one copy) and hit.
  assert r.hits.tolist() == [0, 6] and r.misses.tolist() == [9, 3]
  assert r.loads.tolist() == [9, 3]
  assert r.prefetch_loads.tolist() == [0, 6]
  assert (r.useful.tolist(), r.wasted.tolist()) == ([0, 6], [0, 0])
  assert r.row("wait")[:, 1].tolist() == [0, 0, 0] + [1] * 6
  # Predicted 6 (all right) of 9 actual layer-1 sets; layer 0 is no target.
  assert (r.precision, r.recall) == (1.0, 6 / 9)
  assert (r.precision_k, r.recall_k) == (1.0, 6 / 9)
  assert r.target == "next_layer"
  # Measuring without copying (limit 0): same predictions, no prefetch.
  quiet = sim_prefetch.replay(trace, "lru", 2, predictor="cooccur", limit=0)
  assert quiet.prefetch_loads.sum() == 0 and quiet.recall == r.recall
  assert quiet.hits.tolist() == plain.hits.tolist()


def test_temporal_and_gate_by_hand():
  trace = hand_trace(lookahead=True)
  # Temporal: step 3 has learned 0->1, 1->2 and 2->0, so from step 3 on
  # each step prefetches the next one's expert after its demand (6 copies;
  # the last one, for a step that never comes, stays pending).
  r = sim_prefetch.replay(trace, "lru", 2, predictor="temporal")
  assert r.target == "next_step"
  assert r.prefetch_loads.tolist() == [6, 6]
  assert r.hits.tolist() == [5, 5] and r.useful.tolist() == [5, 5]
  assert r.wasted.tolist() == [0, 0]
  # Gate: the recorded lookahead predicts layer 1 from step 2 on.
  g = sim_prefetch.replay(trace, "lru", 2, predictor="gate")
  assert g.hits.tolist() == [0, 7] and g.prefetch_loads.tolist() == [0, 7]
  with pytest.raises(ValueError, match="needs a trace with lookahead_ids"):
    sim_prefetch.replay(hand_trace(), "lru", 2, predictor="gate")


def test_perfect_oracle_with_min_and_noise():
  trace = synthetic.sticky(3, 8, 2, 2, 40, 1, seed=3, p_keep=0.6)
  base = sim_prefetch.replay(trace, "min", 3)
  bound = sim_prefetch.replay(trace, "min", 3, predictor="oracle")
  assert bound.precision == 1.0
  # Every layer but the first is prefetched in full: no demand miss there.
  assert bound.misses[1:].sum() == 0 and bound.wasted.sum() == 0
  assert bound.copies <= base.copies + 1
  noisy = sim_prefetch.replay(trace, "lru", 3, predictor="oracle",
                              accuracy=0.5, seed=1)
  assert 0.3 < noisy.precision < 0.7 and noisy.wasted.sum() > 0
  # Without prefetch the replay equals wisp_jax.sim.replay's.
  old = replay_lib.replay(trace, "min", 3)
  assert base.hits.tolist() == old.hits.tolist()
  assert base.loads.tolist() == old.loads.tolist()


def test_lookahead_field_round_trip(tmp_path):
  trace = hand_trace(lookahead=True)
  trace.save(tmp_path / "t.npz")
  loaded = RoutingTrace.load(tmp_path / "t.npz")
  assert np.array_equal(loaded.lookahead_ids, trace.lookahead_ids)
  assert loaded.select(np.arange(3)).lookahead_ids.shape == (3, 2, 1)
  hand_trace().save(tmp_path / "old.npz")  # no field: loads as None
  assert RoutingTrace.load(tmp_path / "old.npz").lookahead_ids is None
  with pytest.raises(ValueError, match="lookahead_ids"):
    RoutingTrace(step=[0], request=[0], phase=[1], position=[0],
                 ids=[[[1]]], weights=[[[1.0]]], num_experts=6,
                 lookahead_ids=[[[6]]])


def test_bad_arguments():
  trace = hand_trace()
  with pytest.raises(ValueError, match="never changes its slots"):
    sim_prefetch.replay(trace, "pinned", 2)
  with pytest.raises(ValueError, match="Unknown predictor"):
    sim_prefetch.replay(trace, "lru", 2, predictor="psychic")
  with pytest.raises(ValueError, match="accuracy"):
    sim_prefetch.replay(trace, "lru", 2, predictor="oracle", accuracy=2)
