"""Tests of the executed side of wisp_jax/runs/model_check.py: the rates
counted from recorded passes and the comparison's arithmetic. (The whole
check serves real engine runs: `experiments/model_check.py
--config=configs/model_check.py:tiny`, about a minute, is not in CI.)"""

import dataclasses

import numpy as np

import pytest

from wisp_jax.alloc.split import Split
from wisp_jax.models.config import get_config
from wisp_jax.runs import model_check
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.sim import cost
from wisp_jax.sim.hardware import get_profile
from wisp_jax.traces.trace import DECODE
from wisp_jax.traces.trace import RoutingTrace


@dataclasses.dataclass
class Record:  # the fields of an engine step record that are read
  batch_size: int
  prefills: int
  preemptions: int
  kv_blocks_in_use: int


P = model_check.Pass


def test_executed_rates_by_hand():
  c, hw = get_config("tiny"), get_profile("rtx3090")
  window = [
      (Record(2, 1, 0, 10), [P("prefill", 1, 12, 1, 3, 4),
                             P("decode", 2, 30, 2, 2, 2)]),
      (Record(2, 0, 1, 14), [P("decode", 2, 34, 3, 1, 3)]),
  ]
  got = model_check.executed_rates(window, c, hw, 2)
  assert got["batch"] == 2.0
  assert got["decode_misses"] == 1.5 and got["decode_loads"] == 2.5
  assert got["prefill_loads"] == 4.0 and got["prefills"] == 0.5
  assert got["preemptions"] == 0.5 and got["kv_in_use"] == 12.0
  assert got["tokens_per_step"] == (2 + 1 + 2 + 0) / 2
  tau = cost.expert_bytes(c, 2) / hw.h2d_bytes_per_s

  def priced(phase, batch, context, needed, loads):
    return cost.step_cost(c, hw, batch=batch, context_len=context,
                          mode="paged", phase=phase, misses=0,
                          needed_experts=needed,
                          bytes_per_param=2).total_s + tau * loads

  seconds = (priced("prefill", 1, 12, 4, 4) + priced("decode", 2, 15, 4, 2)
             + priced("decode", 2, 17, 4, 3))
  assert got["seconds_per_token"] == pytest.approx(seconds / 5, rel=1e-12)


def test_relative_standard_errors_by_batch_means():
  c, hw = get_config("tiny"), get_profile("rtx3090")
  step = lambda misses, prefill: (Record(1, int(prefill), 0, 10), [
      P("decode", 1, 20, 0, misses, misses)] + (
          [P("prefill", 1, 8, 0, 4, 4)] if prefill else []))
  # Two parts of two steps: decode misses 1 and 3 per pass (mean 2).
  window = [step(1, True), step(1, False), step(3, False), step(3, False)]
  got = model_check.relative_standard_errors(window, c, hw, 2, chunks=2)
  want = np.std([1.0, 3.0], ddof=1) / np.sqrt(2) / 2.0
  assert got["decode_misses"] == pytest.approx(want)
  assert got["batch"] == 0.0  # one row in every pass
  # Only the first part has a prefill: no spread to measure.
  assert np.isnan(got["prefill_loads"])
  assert np.isnan(got["preemptions"])  # none executed
  with pytest.raises(ValueError, match="chunks"):
    model_check.relative_standard_errors(window, c, hw, 2, chunks=1)


def test_relative_error_and_splits():
  assert model_check.relative_error("batch", 5.5, 5.0) == pytest.approx(0.1)
  # Rare events: within the absolute floor both sides count as equal.
  assert model_check.relative_error("preemptions", 0.012, 0.005) == 0.0
  assert model_check.relative_error("decode_misses", 1.0, 0.0) == float("inf")
  wc = type("W", (), {"slots": "2,4", "kv_blocks": "20"})()
  assert model_check.splits_of(wc, 2) == [Split.make(2, 20, 2),
                                          Split.make(4, 20, 2)]


def _pass(kind, needed):
  return P(kind, 1, 4, 0, 0, 0, np.array([needed], bool))


def test_replayed_counts_of_executed_passes_by_hand():
  # One layer, E=3, one slot. The replay starts warm with the experts
  # ranked in id order (0 on top): {0} hits, then {1}, {0}, {1} miss. The
  # prefill {0, 1, 2} finds 1 resident and copies 0 and 2 (the expert it
  # keeps, 0, was not resident before: no overflow reload).
  window = [(None, [_pass("decode", [1, 0, 0]), _pass("decode", [0, 1, 0])]),
            (None, [_pass("decode", [1, 0, 0]), _pass("decode", [0, 1, 0]),
                    _pass("prefill", [1, 1, 1])])]
  got = model_check.replayed_counts(window, Split.make(1, 20, 1))
  assert got["decode_misses"] == 3 / 4
  # Without needed sets (a policy that keeps no last use) there is none.
  bare = [(None, [P("decode", 1, 4, 0, 0, 0)])]
  assert model_check.replayed_counts(bare, Split.make(1, 20, 1)) is None
  assert got["prefill_loads"] == 2


def _trace(num_requests, tokens_each=3):
  n = num_requests * tokens_each
  request = np.repeat(np.arange(num_requests), tokens_each)
  return RoutingTrace(step=np.arange(n), request=request,
                      phase=np.full(n, DECODE),
                      position=np.tile(np.arange(tokens_each), num_requests),
                      ids=(request % 4)[:, None, None] * np.ones((1, 1, 2),
                                                                int) +
                      np.array([0, 4]),
                      weights=np.full((n, 1, 2), 0.5), num_experts=8)


def test_half_samples_take_whole_requests():
  trace = _trace(10)
  halves = model_check.half_samples(trace, 3, seed=0)
  assert len(halves) == 3
  chosen = [tuple(np.unique(h.request)) for h in halves]
  for ids, half in zip(chosen, halves):
    assert len(ids) == 5
    # Every event of a chosen request, and its routing, is kept.
    keep = np.isin(trace.request, ids)
    assert np.array_equal(half.ids, trace.ids[keep])
    assert np.array_equal(half.position, trace.position[keep])
  assert len(set(chosen)) > 1  # independent draws
  assert [tuple(np.unique(h.request)) for h in
          model_check.half_samples(trace, 3, seed=0)] == chosen
  with pytest.raises(ValueError, match="at least 4"):
    model_check.half_samples(_trace(3), 2, seed=0)


def test_relative_spread_by_hand():
  whole = {"decode_misses": 2.0, "batch": 4.0, "preemptions": 0.0}
  parts = [{"decode_misses": 2.2, "batch": 4.0, "preemptions": 0.1},
           {"decode_misses": 1.6, "batch": 4.0, "preemptions": 0.0}]
  got = model_check.relative_spread(whole, parts)
  assert got["decode_misses"] == pytest.approx(np.sqrt((0.1**2 + 0.2**2) / 2))
  assert got["batch"] == 0.0
  assert np.isnan(got["preemptions"])  # no rate to be relative to
  assert np.isnan(model_check.relative_spread(whole, [])["batch"])


def _row(error, executed_se, profile_se, tag="held"):
  names = [m for m, _ in model_check.METRICS]
  return {"set": tag, "error": dict.fromkeys(names, error),
          "executed_relative_se": dict.fromkeys(names, executed_se),
          "profile_relative_se": None if profile_se is None else
          dict.fromkeys(names, profile_se)}


def test_agreement_counts_each_criterion():
  rows = [_row(0.04, 0.01, 0.01),    # within 5%
          _row(0.12, 0.07, 0.01),    # within 2 executed SE
          _row(0.20, 0.06, 0.08),    # within 2 SE of the difference only
          _row(0.30, 0.06, 0.08),    # outside every criterion
          _row(0.50, 0.0, 0.0, tag="fit")]
  got = model_check._agreement(rows, "held")["decode_misses"]
  assert got["runs"] == 4
  assert got["worst_abs_error"] == 0.30
  assert got["within_5pct"] == 1
  assert got["within_5pct_or_2se"] == 2
  assert got["within_5pct_or_2se_both"] == 3
  assert got["median_profile_relative_se"] == pytest.approx(0.045)
  # Without half samples there is no profile error to judge by.
  bare = model_check._agreement([_row(0.2, 0.06, None)], "held")
  assert bare["decode_misses"]["within_5pct_or_2se_both"] is None
  assert bare["decode_misses"]["within_5pct_or_2se"] == 0


def test_recompute_rates_split_prefills_by_kind():
  window = [(None, [P("prefill", 1, 12, 0, 6, 6),
                    P("prefill", 1, 20, 0, 2, 2, recompute=True),
                    P("decode", 2, 30, 2, 2, 2)]),
            (None, [P("prefill", 1, 12, 0, 4, 4)])]
  got = model_check.recompute_rates(window)
  assert got["recompute_share"] == pytest.approx(1 / 3)
  assert got["new_prefill_loads"] == 5.0
  assert got["recompute_prefill_loads"] == 2.0
  fresh = model_check.recompute_rates(window[1:])
  assert fresh["recompute_share"] == 0.0
  assert np.isnan(fresh["recompute_prefill_loads"])


def test_pass_recorder_flags_the_prefills_that_re_admit_preempted_requests():
  # Requests of up to 6 blocks of 4 in a pool of 10: the engine preempts,
  # and each preempted request is prefilled again once re-admitted.
  model = model_check.make_model("tiny", 0, "float32")
  engine = Engine(model, None, 2, 10, 4, 4, min_prefill_bucket=32)
  recorder = model_check.PassRecorder(engine)
  rng = np.random.default_rng(0)
  requests = [Request(rng.integers(0, 61, size=n), 24 - n, request_id=i)
              for i, n in enumerate([5, 13, 5, 13, 13, 5])]
  results = engine.run(requests)
  assert all(r.error is None for r in results)
  prefills = [p for p in recorder.take() if p.kind == "prefill"]
  assert engine.num_preemptions >= 1
  assert sum(p.recompute for p in prefills) == engine.num_preemptions
  assert sum(not p.recompute for p in prefills) == len(requests)
