"""Tests of prefetch: `pager.prefetch_layer`, the predictors of
wisp_jax/paging/predictors.py, and the prefetching paged source (live ==
resident bit for bit, live counters == replay counters).

The generate calls run under `jax.transfer_guard("disallow")`.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging import pager, predictors
from wisp_jax.paging.policies import get_policy
from wisp_jax.runs.prefetch import record_lookahead
from wisp_jax.serving import generate as generate_lib
from wisp_jax.serving import step as step_lib
from wisp_jax.sim import prefetch as sim_prefetch
from wisp_jax.traces.trace import from_generate

E = 4


def mask(*experts):
  m = np.zeros(E, bool)
  m[list(experts)] = True
  return jnp.asarray(m)


def scores(*experts):
  s = np.zeros(E, np.int32)
  s[list(experts)] = 1
  return jnp.asarray(s)


def test_prefetch_counts_by_hand():
  lru = get_policy("lru")
  ls = pager.layer_state(pager.init_state(lru, 1, E, 2), 0)

  page = jax.jit(lambda ls, needed, tick: pager.page_layer(
      lru, ls, needed, tick, None, None)[0])
  fetch = jax.jit(lambda ls, s, size, protect, limit, tick:
                  pager.prefetch_layer(lru, ls, s, size, protect, limit, tick,
                                       None, None)[0])

  def demand(ls, tick, *experts):
    return page(ls, mask(*experts), jnp.int32(tick))

  def prefetch(ls, tick, predicted, protect=(), limit=2):
    return fetch(ls, scores(*predicted), jnp.int32(len(predicted)),
                 mask(*protect), jnp.int32(limit), jnp.int32(tick))

  resident = lambda ls: set(np.flatnonzero(np.asarray(ls.slot_of_expert)
                                           >= 0).tolist())
  ls = demand(ls, 0, 0, 1)  # two cold misses
  # Predicting 2 while 0 is needed: the victim is 1, never 0.
  ls = prefetch(ls, 0, [2], protect=[0])
  assert resident(ls) == {0, 2} and int(ls.prefetch_loads) == 1
  ls = demand(ls, 1, 2)  # a hit on the prefetched expert: useful
  assert (int(ls.hits), int(ls.misses), int(ls.useful)) == (1, 2, 1)
  ls = prefetch(ls, 1, [3])  # LRU victim 0 (last used at 0)
  assert resident(ls) == {2, 3}
  # A prefetch never evicts a pending prefetch nor the predicted set: with
  # 2 and 3 kept, nothing can be taken.
  ls = prefetch(ls, 1, [1, 2])
  assert resident(ls) == {2, 3} and int(ls.prefetch_loads) == 2
  ls = demand(ls, 2, 0, 2)  # 0 misses and evicts 3, never used: wasted
  assert resident(ls) == {0, 2}
  assert (int(ls.hits), int(ls.misses), int(ls.loads)) == (2, 3, 3)
  assert (int(ls.prefetch_loads), int(ls.useful), int(ls.wasted)) == (2, 1, 1)
  # limit 0 copies nothing; the predicted set's ties prefer residents.
  assert resident(prefetch(ls, 2, [1], limit=0)) == {0, 2}
  top = pager.top_set(jnp.asarray([0, 1, 1, 1], jnp.int32), 2, mask(3))
  assert np.asarray(top).tolist() == [False, True, False, True]


def test_default_prefetch_size():
  # The layer's needed count while below capacity, else capacity - 1.
  sizes = [int(pager.default_prefetch_size(4, n)) for n in (1, 3, 4, 9)]
  assert sizes == [1, 3, 3, 3]


def test_transition_predictor_by_hand():
  p = predictors.get_predictor("cooccur")
  state = jax.tree.map(jnp.asarray, p.init(E))
  # Source {0} led to {2} twice and to {3} once; source {1} to {3}.
  for source, needed in (((0,), (2,)), ((0,), (2, 3)), ((0,), (1,)),
                         ((1,), (3,))):
    state = p.update(state, mask(*source), mask(*needed))
  probs = np.asarray(predictors.transition_probs(state))
  assert probs[0].tolist() == [0, 341, 682, 341]  # 1/3, 2/3, 1/3 of 1024
  assert probs[1].tolist() == [0, 0, 0, 1024]
  assert probs[2].tolist() == [0] * E  # never a source
  got = p.predict(state, mask(0, 1).astype(jnp.int32))
  assert np.asarray(got).tolist() == [0, 341, 682, 1365]
  assert predictors.get_predictor("temporal").target == "next_step"
  gate = predictors.get_predictor("gate")
  counts = predictors.lookahead_counts(jnp.asarray([[1, 3], [3, -1]]), E)
  assert np.asarray(gate.predict((), counts)).tolist() == [0, 1, 0, 2]
  with pytest.raises(ValueError, match="known predictors: cooccur"):
    predictors.get_predictor("markov")


def test_precision_recall_by_hand():
  predicted = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], bool)
  actual = np.array([[1, 0, 0, 0], [0, 1, 1, 1]], bool)
  # 2 correct of 3 predicted, of 4 actual.
  assert predictors.precision_recall(predicted, actual) == (2 / 3, 2 / 4)


CONFIG = get_config("tiny")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]  # equal lengths: no padding
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tiny():
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  bank = bank_lib.make_bank(model.experts.weights())
  with jax.transfer_guard("disallow"):
    ref = generate_lib.generate(model, PROMPTS, NEW_TOKENS,
                                return_logits=True, record_routing=True)
  return model, bank, ref


# lrfu_gate recomputes the gate weights from the routers; temporal and lrfu
# run live in `python -m wisp_jax.serving.exactness` and in replay tests.
@pytest.mark.parametrize("policy,prefetch", [("lru", "gate"),
                                             ("lrfu_gate", "cooccur")])
def test_live_prefetch_is_exact_and_replay_counts_it(tiny, policy, prefetch,
                                                     monkeypatch):
  model, bank, ref = tiny
  # The decode step compiles once, the recorded lookahead included (the
  # trace counter is per function, so it is cleared for each case).
  chex.clear_trace_counter()
  monkeypatch.setattr(generate_lib, "decode_step", step_lib.jit_step(
      chex.assert_max_traces(step_lib.step_impl, n=1)))
  with jax.transfer_guard("disallow"):
    out = generate_lib.generate(
        model, PROMPTS, NEW_TOKENS, experts="paged", slots_per_layer=3,
        policy=policy, bank=bank, prefetch=prefetch, return_logits=True,
        record_routing=True)
  assert np.array_equal(out.logits, ref.logits)
  assert np.array_equal(out.tokens, ref.tokens)
  s = out.stats
  trace = from_generate(out, CONFIG)
  assert (trace.lookahead_ids is not None) == (prefetch == "gate")
  if prefetch == "gate":  # layer L-1 has no next layer
    assert np.all(trace.lookahead_ids[:, -1] == -1)
    assert np.all(trace.lookahead_ids[:, 0] >= 0)
  r = sim_prefetch.replay(trace, policy, 3, predictor=prefetch)
  live = [s.hits, s.misses, s.loads, s.prefetch_loads, s.useful_prefetches,
          s.wasted_prefetches]
  replayed = [r.hits, r.misses, r.loads, r.prefetch_loads, r.useful,
              r.wasted]
  assert [x.tolist() for x in live] == [x.tolist() for x in replayed]
  assert s.prefetch_loads.sum() > 0
  assert np.all(s.useful_prefetches + s.wasted_prefetches
                <= s.prefetch_loads)
  assert s.bytes_moved == (s.loads.sum() + s.prefetch_loads.sum()) * (
      bank_lib.bytes_per_expert(bank))


# Every evicting live policy with prefetch on, each under one of the
# predictors in turn: outputs stay those of resident, bit for bit. (pinned
# never changes its slots and refuses prefetch: test_prefetch_refusals.)
@pytest.mark.parametrize("policy,prefetch", [
    ("lru", "cooccur"), ("lfu", "temporal"), ("fifo", "gate"),
    ("ws", "cooccur"), ("lrfu", "gate"),
    ("lrfu_gate", "temporal")])
def test_prefetch_keeps_every_policy_exact(tiny, policy, prefetch):
  model, bank, ref = tiny
  options = {"ws": {"tau": 4}, "lfu": {"age_every": 16}}.get(policy)
  with jax.transfer_guard("disallow"):
    out = generate_lib.generate(
        model, PROMPTS, NEW_TOKENS, experts="paged", slots_per_layer=3,
        policy=policy, policy_options=options, bank=bank,
        prefetch=prefetch, return_logits=True)
  assert np.array_equal(out.logits, ref.logits), (policy, prefetch)
  assert np.array_equal(out.tokens, ref.tokens)
  s = out.stats
  assert np.all(s.useful_prefetches + s.wasted_prefetches
                <= s.prefetch_loads)
  assert s.prefetch_loads.sum() > 0, policy


def test_prefetch_refusals(tiny):
  model, bank, ref = tiny
  hot = api.hot_set_from_routing(ref.routing_ids, CONFIG.num_experts, 3)
  with pytest.raises(ValueError, match="prefetch needs an evicting policy"):
    generate_lib.generate(model, PROMPTS, 2, experts="paged",
                          slots_per_layer=3, policy="pinned", hot_set=hot,
                          bank=bank, prefetch="cooccur")
  with pytest.raises(ValueError, match="not a live predictor"):
    generate_lib.generate(model, PROMPTS, 2, experts="paged",
                          slots_per_layer=3, bank=bank, prefetch="oracle")
  with pytest.raises(ValueError, match="feature of experts='paged'"):
    generate_lib.generate(model, PROMPTS, 2, experts="transient", bank=bank,
                          prefetch="cooccur")
  with pytest.raises(ValueError, match="unknown prefetch_options"):
    generate_lib.generate(model, PROMPTS, 2, experts="paged",
                          slots_per_layer=3, bank=bank, prefetch="cooccur",
                          prefetch_options={"depth": 2})


def test_record_lookahead_keeps_the_resident_routing(tiny):
  model, _, ref = tiny
  with jax.transfer_guard("disallow"):
    trace = record_lookahead(model, PROMPTS, NEW_TOKENS, batch_size=2)
  plain = from_generate(ref, CONFIG)
  assert np.array_equal(trace.ids, plain.ids)
  assert np.array_equal(trace.step, plain.step)
  assert trace.lookahead_ids.shape == trace.ids.shape
  assert np.all(trace.lookahead_ids[:, -1] == -1)
  assert np.all(trace.lookahead_ids[:, :-1] >= 0)
