"""Tests of wisp_jax/serving/record.py: recording sampled routing."""

import numpy as np

from wisp_jax.serving import record as record_lib
from wisp_jax.traces import trace as trace_lib

PROMPTS = [np.arange(3, 11), np.arange(40, 48), np.arange(50, 58)]


def _request_routing(trace, i):
  keep = trace.request == i
  return trace.position[keep], trace.ids[keep]


def test_sampled_prompt_routes_as_the_lone_request_with_its_seed(tiny_model):
  # Prompt i of a wave samples like a lone request with seed `seed + i`,
  # which is what the engine draws for that request.
  batched = record_lib.record(tiny_model, PROMPTS, 6, 2, temperature=1.0,
                              seed=5)
  for i, prompt in enumerate(PROMPTS):
    lone = record_lib.record(tiny_model, [prompt], 6, 1, temperature=1.0,
                             seed=5 + i)
    want = _request_routing(lone, 0)
    got = _request_routing(batched, i)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_greedy_is_the_default_and_seed_free(tiny_model):
  plain = record_lib.record(tiny_model, PROMPTS, 6, 2)
  seeded = record_lib.record(tiny_model, PROMPTS, 6, 2, seed=9)
  assert np.array_equal(plain.ids, seeded.ids)
  sampled = record_lib.record(tiny_model, PROMPTS, 6, 2, temperature=1.0)
  decode = sampled.phase == trace_lib.DECODE
  assert not np.array_equal(sampled.ids[decode], plain.ids[decode])
