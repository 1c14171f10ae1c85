"""Tests of wisp_jax/alloc/curves.py and wisp_jax/alloc/workload.py."""

import numpy as np
import pytest

from wisp_jax.alloc import curves as curves_lib
from wisp_jax.alloc.workload import Workload, sample_lengths
from wisp_jax.models.config import get_config
from wisp_jax.sim import mrc
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import DECODE, PREFILL, RoutingTrace
from tests.alloc.testlib import TOY_DEVICE, make_workload


def two_request_trace():
  """Requests 7 and 9 decode 3 and 2 tokens side by side; 7 has a prefill."""
  step = [0, 1, 1, 2, 2, 3]
  request = [7, 7, 9, 7, 9, 7]
  phase = [PREFILL, DECODE, DECODE, DECODE, DECODE, DECODE]
  ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[0, 2]], [[2, 3]],
                  [[1, 2]]])
  return RoutingTrace(step=step, request=request, phase=phase,
                      position=[0, 1, 0, 2, 1, 3], ids=ids,
                      weights=np.ones(ids.shape), num_experts=4)


def test_rebatch_serialises_requests_and_drops_prefill():
  single = curves_lib.rebatch(two_request_trace(), 1)
  # Request 7's decode tokens at steps 0..2, then request 9's at 3..4.
  assert single.step.tolist() == [0, 1, 2, 3, 4]
  assert single.request.tolist() == [7, 7, 7, 9, 9]
  assert single.ids[:, 0].tolist() == [[0, 1], [0, 2], [1, 2], [2, 3],
                                       [2, 3]]
  both = curves_lib.rebatch(two_request_trace(), 2)
  assert both.step.tolist() == [0, 0, 1, 1, 2]
  assert both.request.tolist() == [7, 9, 7, 9, 7]


def test_curves_from_trace_levels_match_mattson():
  trace = synthetic.sticky(3, 8, 2, 4, 20, 4, p_keep=0.7, seed=1)
  curves = curves_lib.curves_from_trace(trace)
  assert curves.concurrency.tolist() == [1.0, 2.0, 4.0]
  masks = curves_lib.rebatch(trace, 2).needed_masks()
  # Steady state: the second of two passes, so first uses are not cold.
  twice = mrc.mattson(np.concatenate([masks, masks])).misses
  once = mrc.mattson(masks)
  np.testing.assert_allclose(curves.misses_per_step[1],
                             (twice - once.misses) / once.num_steps)
  # A cache of all E experts never misses in steady state; the one-pass
  # count charged every first use as a miss at every capacity.
  np.testing.assert_allclose(curves.misses_per_step[:, :, -1], 0.0)
  assert np.all(once.misses[:, -1] > 0)
  assert curves.routing is not None and curves.routing.num_requests == 4
  # A wider working set at higher concurrency.
  refs = curves.references_per_step
  assert np.all(refs[2] > refs[1]) and np.all(refs[1] > refs[0])


def test_curves_at_interpolates_and_extrapolates():
  misses = np.array([[[2.0, 1.0, 0.0]], [[6.0, 3.0, 0.0]]])
  curves = curves_lib.RoutingCurves(
      concurrency=np.array([1.0, 3.0]), misses_per_step=misses,
      references_per_step=misses[:, :, 0], top_k=1)
  got, refs = curves.at(2.0)
  np.testing.assert_allclose(got, [[4.0, 2.0, 0.0]])
  np.testing.assert_allclose(curves.at(0.5)[0], [[1.0, 0.5, 0.0]])
  union = curves_lib.union_size(2, 1, np.array([3.0, 5.0]))
  np.testing.assert_allclose(curves.at(5.0)[1],
                             [6.0 * union[1] / union[0]])
  assert curves.at([1.0, 3.0])[0].shape == (2, 1, 3)


def test_curves_reject_bad_shapes():
  with pytest.raises(ValueError, match="inclusion"):
    curves_lib.RoutingCurves(np.array([1.0]), np.array([[[1.0, 2.0]]]),
                             np.array([[1.0]]), top_k=1)
  with pytest.raises(ValueError, match="increase"):
    curves_lib.RoutingCurves(np.array([2.0, 1.0]), np.zeros((2, 1, 3)),
                             np.zeros((2, 1)), top_k=1)


def test_synthetic_trace_layer_groups_differ_in_locality():
  trace = curves_lib.synthetic_trace(
      4, 16, 2, [dict(kind="sticky", p_keep=0.95), dict(kind="uniform")],
      num_requests=2, tokens_per_request=60, seed=0)
  assert trace.ids.shape == (120, 4, 2)
  ratio = mrc.mattson(trace).miss_ratio[:, 4]
  assert ratio[:2].max() < ratio[2:].min()  # sticky layers hit more
  with pytest.raises(ValueError, match="unknown synthetic trace kind"):
    curves_lib.synthetic_trace(2, 8, 2, [dict(kind="markov")], 2, 4)


def test_kv_demand_by_hand():
  # One request shape: prompt 6, output 4, block size 4: positions 7..10
  # hold 2, 2, 3, 3 blocks (mean 2.5, std 0.5); peak and floor 3 blocks.
  w = make_workload([[2, 2, 1, 1, 1, 1, 0]] * 2, concurrency=4, prompt=6,
                    output=4)
  assert w.held_blocks == pytest.approx(2.5)
  assert w.held_blocks_std == pytest.approx(0.5)
  assert w.mean_context == pytest.approx(8.5)
  assert w.floor_blocks == 3 and w.peak_blocks == 3
  assert w.demand_blocks() == 12  # ceil(4 x 2.5 + 2 x 2 x 0.5)
  assert w.block_bytes == 4 * 80 and w.expert_bytes == 2880


def test_workload_rejects_mismatched_curves():
  curves = curves_lib.RoutingCurves(np.array([1.0]), np.zeros((1, 3, 7)),
                                    np.zeros((1, 3)), top_k=2)
  with pytest.raises(ValueError, match="L=3"):
    Workload(get_config("tiny"), TOY_DEVICE, [4], [4], 1, curves)
  with pytest.raises(ValueError, match="min_concurrency"):
    make_workload([[1] * 7] * 2, concurrency=1, min_concurrency=2)
  prompt, output = sample_lengths(5, (3, 9), (1, 2), seed=0)
  assert prompt.min() >= 3 and prompt.max() <= 9 and output.max() <= 2
