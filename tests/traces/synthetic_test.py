"""Tests of wisp_jax/traces/synthetic.py."""

import numpy as np
import pytest

from wisp_jax.sim import mrc
from wisp_jax.traces import synthetic

SHAPE = dict(num_layers=3, num_experts=16, top_k=2, num_requests=5,
             tokens_per_request=40, batch=2)
GENERATORS = {
    "uniform": lambda seed: synthetic.uniform(**SHAPE, seed=seed),
    "zipf": lambda seed: synthetic.zipf(**SHAPE, alpha=1.2, seed=seed),
    "sticky": lambda seed: synthetic.sticky(**SHAPE, p_keep=0.9, seed=seed),
    "cross_layer": lambda seed: synthetic.cross_layer(**SHAPE, p_follow=0.9,
                                                      seed=seed),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_seeded_determinism_and_distinct_ids(name):
  a, b, c = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
  assert np.array_equal(a.ids, b.ids) and np.array_equal(a.weights,
                                                         b.weights)
  assert not np.array_equal(a.ids, c.ids)
  ordered = np.sort(a.ids.astype(np.int64), axis=-1)
  assert np.all(ordered[..., 1:] > ordered[..., :-1])
  # Gate weights: positive, sum to one, descending.
  assert np.allclose(a.weights.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.diff(a.weights, axis=-1) <= 0)


def test_wave_schedule():
  t = synthetic.uniform(num_layers=1, num_experts=4, top_k=1,
                        num_requests=3, tokens_per_request=2, batch=2)
  # Wave 0: requests 0, 1 over steps 0, 1; wave 1: request 2 over 2, 3.
  assert np.array_equal(t.step, [0, 0, 1, 1, 2, 3])
  assert np.array_equal(t.request, [0, 1, 0, 1, 2, 2])
  assert np.array_equal(t.position, [0, 0, 1, 1, 0, 1])
  assert np.all(t.phase == 1)


def _hit_rate(trace, capacity):
  curve = mrc.mattson(trace)
  return curve.hits_at(capacity).sum() / curve.references.sum()


def test_locality_ordering():
  shape = dict(num_layers=2, num_experts=32, top_k=2, num_requests=2,
               tokens_per_request=200, batch=1)
  uniform = _hit_rate(synthetic.uniform(**shape), 4)
  zipf = _hit_rate(synthetic.zipf(**shape, alpha=1.5), 4)
  sticky = _hit_rate(synthetic.sticky(**shape, p_keep=0.9), 4)
  # Uniform: about capacity / E = 0.125 of references hit.
  assert 0.07 < uniform < 0.2
  assert sticky > zipf > uniform
  assert sticky > 0.8


def _layer_pairs(trace):
  """Maps each token's layer-0 expert set to the layer-1 sets seen."""
  seen = {}
  for row in trace.ids.astype(np.int64):
    seen.setdefault(frozenset(row[0]), set()).add(frozenset(row[1]))
  return seen


def test_cross_layer_follows_a_fixed_map():
  shape = dict(num_layers=2, num_experts=8, top_k=2, num_requests=1,
               tokens_per_request=300, batch=1)
  always = _layer_pairs(synthetic.cross_layer(**shape, p_follow=1.0))
  assert all(len(following) == 1 for following in always.values())
  never = _layer_pairs(synthetic.cross_layer(**shape, p_follow=0.0))
  assert max(len(following) for following in never.values()) > 1


def test_sticky_keeps_everything_at_p_one():
  t = synthetic.sticky(num_layers=2, num_experts=8, top_k=3,
                       num_requests=1, tokens_per_request=5, batch=1,
                       p_keep=1.0)
  first = np.sort(t.ids[0], axis=-1)
  assert all(np.array_equal(np.sort(row, axis=-1), first) for row in t.ids)


@pytest.mark.parametrize("change, message", [
    (dict(top_k=20), "top_k=20 exceeds num_experts=16"),
    (dict(batch=0), "batch must be a positive int"),
])
def test_bad_arguments(change, message):
  with pytest.raises(ValueError, match=message):
    synthetic.uniform(**{**SHAPE, **change})
  with pytest.raises(ValueError, match="p_keep is a probability"):
    synthetic.sticky(**SHAPE, p_keep=1.5)
