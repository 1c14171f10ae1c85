"""Tests of wisp_jax/serving/controller.py and Engine.resize."""

import dataclasses

import jax
import numpy as np
import pytest

from wisp_jax.serving import controller as ctl
from wisp_jax.serving.budget import (BudgetError, DeviceBudget, Footprint,
                                     Split)
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.serving.generate import generate

# The tiny model at block size 16: experts of 5760 bytes, blocks of 2560,
# a KV floor of 16 blocks (max_seq_len 256). Requests of 8 + 16 tokens
# (2 blocks) in pairs that run in lockstep, so the steps compile for one
# prefill bucket and one decode bucket per pool size.
ENGINE = dict(block_size=16, max_batch=2, min_prefill_bucket=32, num_slots=4)
PROMPT, NEW = 8, 16
# Slots 4 + KV 16 and slots 2 + KV 25 both use 87040 bytes: the budget.
# Growing KV before shrinking slots would pass through 4 + 25 = 110080.
WIDE = Split.make(4, 16, 2)
DEEP = Split.make(2, 25, 2)
POOLS = 87040


def _budget(model):
  budget = DeviceBudget(1).for_model(model, ENGINE["block_size"])
  total = budget.footprint.dense_bytes + POOLS
  return DeviceBudget(total, 0, budget.footprint)


def _requests(count=4, seed=0):
  rng = np.random.default_rng(seed)
  return [Request(rng.integers(0, 61, PROMPT), NEW, request_id=i)
          for i in range(count)]


def _reference(model, request):
  return generate(model, [np.asarray(request.prompt)], NEW).tokens[0]


class _Scripted:
  """A rule that returns the given splits, one per window, then stays."""
  name = "scripted"

  def __init__(self, splits):
    self.splits = list(splits)
    self.windows = []

  def decide(self, current, window):
    self.windows.append(window)
    return self.splits.pop(0) if self.splits else current


@pytest.mark.parametrize("barrier", ["preempt", "finish"])
def test_resize_cycle_mid_generation_is_exact_lossless_within_budget(
    tiny_model, barrier):
  budget = _budget(tiny_model)
  requests = _requests()
  plain = Engine(tiny_model, budget, WIDE.slots_per_layer, WIDE.kv_blocks,
                 **ENGINE).run(requests)
  engine = Engine(tiny_model, budget, WIDE.slots_per_layer, WIDE.kv_blocks,
                  **ENGINE)
  # Shrink slots / grow KV after 3 steps, then back after 3 more.
  rule = _Scripted([DEEP, WIDE])
  control = ctl.Controller(engine, rule, window=3, barrier=barrier)
  with jax.transfer_guard("disallow"):
    results = engine.run(requests, on_step=control.on_step)
  # What a drain would re-prefill: each running request's held tokens.
  contexts = [c for w in rule.windows for o in w for c in o.contexts]
  assert contexts and all(PROMPT < c <= PROMPT + NEW for c in contexts)

  resizes = control.history[1:]
  assert [(r["slots_per_layer"], r["kv_blocks"]) for r in resizes] == [
      ([2, 2], 25), ([4, 4], 16)]
  for resize in resizes:
    # Shrink first: every split passed through fits; growing first would
    # not have.
    assert max(resize["used_bytes"]) <= budget.total_bytes
    assert resize["used_bytes"][1] == (budget.footprint.dense_bytes +
                                       2 * 2 * 5760 + 16 * 2560)
  assert budget.usage(Split.make(4, 25, 2))["used_bytes"] > (
      budget.total_bytes)
  if barrier == "preempt":
    # Both resizes hit requests in the middle of their generation.
    assert [r["preempted"] for r in resizes] == [2, 2]
    assert engine.num_preemptions == 4
  assert engine.split == WIDE and engine.allocator.num_blocks == 16
  for request, result, base in zip(requests, results, plain):
    assert result.finish_reason == "length" and len(result.tokens) == NEW
    assert np.array_equal(result.tokens, base.tokens), request.request_id
    assert np.array_equal(result.tokens, _reference(tiny_model, request))
  assert engine.allocator.num_in_use == 0


def test_engine_resize_keeps_residents_that_fit_and_refuses_bad_splits(
    tiny_model):
  budget = _budget(tiny_model)
  requests = _requests(2, seed=1)
  engine = Engine(tiny_model, budget, WIDE.slots_per_layer, WIDE.kv_blocks,
                  **ENGINE)
  for request in requests:
    engine.submit(request)
  for _ in range(4):
    engine.step()
  with pytest.raises(RuntimeError, match="2 requests are running"):
    engine.resize(DEEP)
  assert engine.drain() == 2 and engine.queue_length == 2
  with pytest.raises(BudgetError, match="exceeds the device budget"):
    engine.resize(Split.make(4, 25, 2))
  with pytest.raises(ValueError, match=r"\[top_k=2, 4\]"):
    engine.resize(Split.make(5, 16, 2))

  def tables():
    state = engine.pager_state
    return jax.device_get((state.slot_of_expert,
                           state.policy_state.last_use))

  slot_of_expert, last_use = tables()
  done = engine.resize(DEEP)  # 4 -> 2 slots per layer
  after, _ = tables()
  for layer in range(2):
    residents = np.flatnonzero(slot_of_expert[layer] >= 0)
    kept = sorted(residents, key=lambda e: (-last_use[layer, e], e))[:2]
    assert sorted(np.flatnonzero(after[layer] >= 0)) == sorted(kept)
    assert np.all(after[layer][after[layer] >= 0] < 2)
  assert done["evicted"] == sum(max(np.sum(s >= 0) - 2, 0)
                                for s in slot_of_expert)
  engine.resize(Split.make(3, 16, 2))  # grow slots: nothing moves
  grown, _ = tables()
  np.testing.assert_array_equal(grown, after)
  while engine.has_work:
    engine.step()
  for request in requests:
    assert np.array_equal(engine.results[request.request_id].tokens,
                          _reference(tiny_model, request))


def _footprint_budget(free_bytes):
  footprint = Footprint(dense_bytes=1000, expert_bytes=5760, block_bytes=2560,
                        block_size=16, num_layers=2, num_experts=6, top_k=2,
                        max_seq_len=256, bytes_per_param=4,
                        kv_bytes_per_value=4)
  return DeviceBudget(1000 + free_bytes, 0, footprint)


def _window(split, peak, waiting=0, needed=(), lengths=None, steps=4):
  needed = list(needed) or [None] * steps
  return [ctl.Observation(step=i, kv_blocks=split.kv_blocks,
                          kv_peak=min(peak, split.kv_blocks), batch=1,
                          waiting=waiting, kv_waiting=waiting, needed=need,
                          lengths=lengths or {})
          for i, need in enumerate(needed)]


def test_step_curve_dead_zone_prevents_oscillation_on_a_steady_workload():
  # 4 top_k slots + 40 blocks. A steady load: peaks of 21..23 blocks. At
  # 20% headroom the targets (26..28 blocks) straddle the bytes of one
  # more slot per layer (5 x 2 slots leave 26 blocks, 4 x 2 leave 31).
  budget = _footprint_budget(4 * 5760 + 40 * 2560)

  def changes(dead_zone):
    rule = ctl.StepCurveRule(budget, headroom=0.2, dead_zone=dead_zone)
    split, moves = Split.make(2, 40, 2), []
    for w in range(12):
      chosen = rule.decide(split, _window(split, [21, 23, 22][w % 3]))
      if chosen != split:
        moves.append((w, chosen.slots_per_layer, chosen.kv_blocks))
      split = chosen
    return moves

  # One move from the all-KV start, then the split holds.
  assert changes(0.1) == [(0, (5, 5), 26)]
  # Without the dead zone the same load flips the split every window or two.
  flips = changes(0.0)
  assert len(flips) >= 6
  assert {m[1:] for m in flips} == {((5, 5), 26), ((4, 4), 31)}
  # Requests waiting for KV: the pool counts as full and grows.
  rule = ctl.StepCurveRule(budget, headroom=0.2, dead_zone=0.1)
  split = Split.make(5, 26, 2)
  grown = rule.decide(split, _window(split, 20, waiting=3))
  # Full pool of 26 -> target 32 blocks -> 3 slots per layer, 35 blocks.
  assert grown == Split.make(3, 35, 2)


def _local_routing(steps):
  """Each step needs 2 of the same 3 experts in every layer."""
  masks = np.zeros((steps, 2, 6), bool)
  for t in range(steps):
    masks[t, :, [t % 3, (t + 1) % 3]] = True
  return masks


TOY = {"name": "toy", "h2d_bytes_per_s": 5760 / 1e-3, "hbm_bytes_per_s": 1e10,
       "bf16_flops": 1e12, "memory_bytes": 2**30, "step_overhead_s": 2e-3}


@pytest.mark.parametrize("kv_model", ["fluid", "simulate"])
def test_mv_rule_follows_locality_and_waiting_requests(tiny_model, kv_model):
  config = tiny_model.config
  # Room for 6 slots per layer next to the 16-block floor.
  budget = _footprint_budget(6 * 2 * 5760 + 16 * 2560)
  masks = _local_routing(32)

  def decide(split, waiting, lengths):
    rule = ctl.MVRule(budget, config, TOY, max_batch=8, kv_model=kv_model)
    chosen = rule.decide(split, _window(split, 2, waiting, masks,
                                        lengths))
    used = budget.usage(chosen)["used_bytes"]
    assert used <= budget.total_bytes
    return chosen, rule

  # High locality, nobody waiting: bytes move from KV to expert slots.
  kv_heavy = Split.make(2, 34, 2)
  chosen, rule = decide(kv_heavy, 0, {0: (10, 20)})
  assert sum(chosen.slots_per_layer) > 4 and chosen.kv_blocks < 34
  assert rule.curves.concurrency.tolist() == [1.0]
  # Every slot taken: the same routing keeps the split...
  slot_heavy = Split.make(6, 16, 2)
  kept, rule = decide(slot_heavy, 0, {0: (150, 60)})
  assert kept == slot_heavy and rule.last_gain <= 0.05
  # ... until long requests wait for KV: bytes move from slots to KV.
  waiting = {i: (150, 60) for i in range(7)}
  chosen, rule = decide(slot_heavy, 6, waiting)
  assert chosen.kv_blocks > 16 and sum(chosen.slots_per_layer) < 12
  assert rule.last_gain > 0.05


def test_mv_rule_moves_once_the_savings_pay_for_the_drain(tiny_model):
  config = tiny_model.config
  budget = _footprint_budget(6 * 2 * 5760 + 16 * 2560)
  kv_heavy = Split.make(2, 34, 2)
  lengths = {0: (10, 20), 1: (150, 60)}

  def moves(contexts, starts=(0, 8, 16, 24), **kwargs):
    """The decisions (moved or not) of one rule over windows of 8 local
    steps from `starts` with `contexts` running."""
    rule = ctl.MVRule(budget, config, TOY, max_batch=8, **kwargs)
    window = [dataclasses.replace(o, contexts=contexts) for o in _window(
        kv_heavy, 2, 0, _local_routing(8), lengths)]
    out = []
    for start in starts:
      chosen = rule.decide(kv_heavy, [dataclasses.replace(
          o, step=start + o.step) for o in window])
      out.append(chosen != kv_heavy)
      if out[-1]:
        assert chosen.kv_blocks < 34
        break
      # Waiting: the savings passed up so far fall short of the drain.
      assert 0 < rule.saved_s < rule.last_drain_s
    return out

  # Nothing running: the drain costs nothing, the move is made at once.
  assert moves(()) == [True]
  # Eight running requests: one window's predicted saving (about 13 ms on
  # this profile) is short of eight re-prefills (about 16 ms); two pay.
  assert moves((30,) * 8) == [False, True]
  assert moves((30,) * 8, price_moves=False) == [True]
  # One running request: one window pays for its drain.
  assert moves((30,)) == [True]
  # Sixteen re-prefills (about 32 ms) take three windows' savings; a
  # second window 52 unobserved steps after the first (a decision made
  # beside the path) counts the tokens served in between and pays.
  assert moves((30,) * 16) == [False, False, True]
  assert moves((30,) * 16, starts=(0, 60)) == [False, True]


def test_controller_refuses_what_it_cannot_serve(tiny_model):
  budget = _budget(tiny_model)
  fifo = Engine(tiny_model, budget, WIDE.slots_per_layer, WIDE.kv_blocks,
                policy="fifo", **ENGINE)
  rule = ctl.MVRule(budget, tiny_model.config, TOY, max_batch=2)
  with pytest.raises(ValueError, match="last_use.*'fifo'"):
    ctl.Controller(fifo, rule)
  paged = Engine(tiny_model, budget, WIDE.slots_per_layer, WIDE.kv_blocks,
                 **ENGINE)
  with pytest.raises(ValueError, match="price_moves=False"):
    ctl.Controller(paged, rule, barrier="finish")
  ctl.Controller(paged, ctl.MVRule(budget, tiny_model.config, TOY,
                                   max_batch=2, price_moves=False),
                 barrier="finish")
  with pytest.raises(BudgetError, match="DeviceBudget"):
    ctl.Controller(Engine(tiny_model, None, 4, 16, **ENGINE), rule)
  # A budget without room for the KV floor and top_k slots per layer.
  tight = DeviceBudget(budget.footprint.dense_bytes + 16 * 2560, 0,
                       budget.footprint)
  with pytest.raises(BudgetError, match="KV floor 16 blocks"):
    ctl.max_slots_per_layer(tight)
