"""Tests of wisp_jax/alloc/steady.py's stream: which trace request serves
each synthetic request, and the inputs it refuses."""

import numpy as np
import pytest

from wisp_jax.alloc import steady

NUM_EXPERTS = 16
PROMPT = 8  # trace request r's prompt routes to expert PROMPT + r


def marked_routing(lengths) -> steady.RequestRouting:
  """One layer, top-1: every decode token of trace request r routes to
  expert r, its prompt to expert PROMPT + r (a pass names its request)."""
  lengths = np.asarray(lengths, np.int64)
  tokens = np.repeat(np.arange(lengths.size), lengths)[:, None, None]
  prompts = np.zeros((lengths.size, 1, NUM_EXPERTS), bool)
  prompts[np.arange(lengths.size), 0, np.arange(lengths.size) + PROMPT] = True
  return steady.RequestRouting(
      tokens=tokens, starts=np.r_[0, np.cumsum(lengths)[:-1]],
      lengths=lengths, prompts=prompts, num_experts=NUM_EXPERTS,
      first_use=np.zeros((lengths.size, 1, NUM_EXPERTS), np.int64))


def stream(routing, output_len, lanes, steps=300, num_samples=20):
  masks, kinds, measured = steady.engine_stream(
      routing, np.full(num_samples, 8), np.full(num_samples, output_len),
      lanes, steps, warmup=10, seed=3)
  decode = masks[kinds == steady.DECODE_PASS][:, 0]
  prefill = masks[kinds == steady.PREFILL_PASS][:, 0]
  return decode, prefill


def test_a_request_runs_on_one_long_enough_trace_request_no_other_lane_runs():
  # Request 0 (3 decode tokens) is too short for 10; three lanes on the
  # three long ones, never two on one (which would share its experts).
  decode, prefill = stream(marked_routing([3, 30, 30, 30]), 11, lanes=3)
  assert np.all(decode.sum(axis=1) == 3)
  assert not decode[:, 0].any()
  assert prefill.size and not prefill[:, PROMPT].any()
  # No stitching: a lane's expert changes only at a prefill of the lane's
  # next request, so every decode pass after one names that prompt's
  # request.
  masks, kinds, _ = steady.engine_stream(
      marked_routing([3, 30, 30, 30]), np.full(20, 8), np.full(20, 11), 1,
      200, warmup=0, seed=3)
  current = None
  for mask, kind in zip(masks[:, 0], kinds):
    if kind == steady.PREFILL_PASS:
      current = int(np.flatnonzero(mask)[0]) - PROMPT
    elif current is not None:
      assert np.flatnonzero(mask).tolist() == [current]


def test_the_trace_requests_are_used_evenly():
  decode, prefill = stream(marked_routing([30] * 4), 11, lanes=1)
  uses = prefill[:, PROMPT:PROMPT + 4].sum(axis=0)
  assert uses.sum() == prefill.shape[0] > 20
  assert uses.max() - uses.min() <= 1


def test_the_longest_request_is_continued_only_when_none_is_long_enough():
  # Ten decode tokens from trace requests of 3 and 4: the longest (1)
  # continues into request 0 (the next, cyclically), with no prefill.
  masks, kinds, _ = steady.engine_stream(
      marked_routing([3, 4]), np.full(5, 8), np.full(5, 11), 1, 60,
      warmup=0, seed=0)
  prefill = masks[kinds == steady.PREFILL_PASS][:, 0]
  assert prefill[:, PROMPT + 1].all() and not prefill[:, PROMPT].any()
  decode = masks[kinds == steady.DECODE_PASS][:, 0]
  assert decode[:, 0].any() and decode[:, 1].any()


@pytest.mark.parametrize("prompts, outputs, match", [
    ([8, 8], [11], "as many prompt as output"),
    ([], [], "at least one"),
    ([8, 8], [1, 1], "no decode pass"),
])
def test_refuses_length_samples_it_cannot_serve(prompts, outputs, match):
  with pytest.raises(ValueError, match=match):
    steady.engine_stream(marked_routing([30, 30]), prompts, outputs, 2, 50,
                         warmup=0)


def test_default_stream_serves_level_requests_at_every_level():
  routing = marked_routing([30] * 6)
  for level in (1, 3):
    _, kinds, measured = steady.level_stream(
        routing, np.full(10, 8), np.full(10, 11), level)
    starts = np.sum((kinds == steady.PREFILL_PASS) & measured)
    assert starts >= 0.95 * steady.LEVEL_REQUESTS


def _applied(masks, kinds):
  keep = np.isin(kinds, (steady.DECODE_PASS, steady.PREFILL_PASS))
  return masks[keep], kinds[keep]


def test_recompute_probes_leave_the_other_passes_and_counts_alone():
  routing = marked_routing([30] * 6)
  args = (routing, np.full(10, 8), np.full(10, 11), 3, 200, 10)
  plain = steady.engine_stream(*args, seed=4)
  probed = steady.engine_stream(*args, seed=4, probes=True)
  assert (probed[1] == steady.RECOMPUTE_PROBE).sum() > 10
  for got, want in zip(_applied(*probed[:2]), plain[:2]):
    assert np.array_equal(got, want)
  decode, prefill, _ = steady.lru_pass_counts(*probed, num_kinds=3)
  want = steady.lru_pass_counts(*plain)
  for got_counts, want_counts in zip((decode, prefill), want):
    assert got_counts.passes == want_counts.passes
    assert np.array_equal(got_counts.misses, want_counts.misses)
    assert np.array_equal(got_counts.loads, want_counts.loads)


def test_a_probe_re_prefills_a_running_request_with_its_prompt():
  # Each probe needs one trace request's prompt expert and its decode
  # expert, of a request that was running `wait` steps before (three
  # lanes, outputs of 11: wait = round(10 / 3) = 3 steps).
  masks, kinds, _ = steady.engine_stream(
      marked_routing([30] * 6), np.full(10, 8), np.full(10, 11), 3, 200,
      warmup=10, seed=4, probes=True)
  decode_steps = np.flatnonzero(kinds == steady.DECODE_PASS)
  for i in np.flatnonzero(kinds == steady.RECOMPUTE_PROBE):
    need = np.flatnonzero(masks[i, 0])
    assert need.tolist() == [need[0], need[0] + PROMPT] and need[0] < PROMPT
    step = np.searchsorted(decode_steps, i)  # the step it comes before
    assert masks[decode_steps[step - 3], 0, need[0]]
    # Its window, the 3 steps before it: a shadow pass before each pass,
    # the first a SHADOW_START.
    start = np.flatnonzero(kinds[:i] == steady.SHADOW_START)[-1]
    assert decode_steps[step - 4] < start < decode_steps[step - 3]
    window = kinds[start:i]
    assert np.all(np.isin(window[0::2], (steady.SHADOW_START,
                                         steady.SHADOW_PASS)))
    assert np.all(np.isin(window[1::2], (steady.DECODE_PASS,
                                         steady.PREFILL_PASS)))
    assert (window[1::2] == steady.DECODE_PASS).sum() == 3


def test_a_probe_sees_the_shadow_stacks_and_moves_nothing():
  # One layer, E=3, by hand (nothing referenced: 0 on top, then 1, 2).
  # The real passes use 0 then 0; the shadow (the batch without the
  # victim) used 2 in between, so the probe of 0 finds it second, where
  # the real stack has it on top. The probe and the shadow move nothing:
  # the last decode pass finds 2 at the bottom.
  def one(*experts):
    mask = np.zeros((1, 3), bool)
    mask[0, list(experts)] = True
    return mask
  masks = np.stack([one(0), one(2), one(0), one(0), one(2)])
  kinds = np.array([steady.DECODE_PASS, steady.SHADOW_START,
                    steady.DECODE_PASS, steady.RECOMPUTE_PROBE,
                    steady.DECODE_PASS])
  decode, prefill, probe = steady.lru_pass_counts(
      masks, kinds, np.ones(5, bool), num_kinds=3)
  assert decode.passes == 3 and prefill.passes == 0 and probe.passes == 1
  assert decode.misses[0].tolist() == [3, 1, 1, 0]
  assert probe.misses[0].tolist() == [1, 1, 0, 0]
  # A shadow pass needs a copy to move.
  with pytest.raises(ValueError, match="SHADOW_START"):
    steady.lru_pass_counts(masks[:1], np.array([steady.SHADOW_PASS]),
                           np.ones(1, bool), num_kinds=3)
