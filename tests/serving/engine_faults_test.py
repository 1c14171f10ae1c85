"""Tests of wisp_jax/serving/engine.py under faults and bad inputs.

Each test asserts that no request is lost (every one has a final result),
that every KV block comes back, and that the requests a fault does not
touch keep the tokens of `generate` on the resident model alone.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel
from wisp_jax.serving import batch_step
from wisp_jax.serving.engine import (Engine, EngineFailedError,
                                     QueueFullError, Request)
from wisp_jax.serving.generate import generate

# The shapes of engine_test.py: one prefill bucket, decode buckets 1, 2, 4.
ENGINE = dict(slots_per_layer=2, kv_blocks=10, block_size=4, max_batch=4,
              min_prefill_bucket=32)
PROMPT, NEW = 3, 5  # few tokens: every reference shares one shape


def _requests(count, seed=0, **kwargs):
  rng = np.random.default_rng(seed)
  return [Request(rng.integers(0, 61, size=PROMPT), NEW, request_id=i,
                  **kwargs) for i in range(count)]


def _reference(model, request):
  out = generate(model, [np.asarray(request.prompt)], request.max_new_tokens,
                 temperature=request.temperature, seed=request.seed)
  return out.tokens[0].tolist()


def _check_clean(engine, model, requests, results):
  """Every request finished exactly as alone; every block came back."""
  for request, result in zip(requests, results):
    assert result.error is None, (request.request_id, result.error)
    assert result.finish_reason == "length"
    assert result.tokens == _reference(model, request), request.request_id
  assert engine.allocator.num_in_use == 0


def _inject(monkeypatch, name, fail_on, after=False):
  """Swaps `batch_step.<name>` for a wrapper that raises on the calls
  numbered in `fail_on` (from 1), before the real (donating) step or after
  it; returns the list of call numbers seen."""
  real = getattr(batch_step, name)
  calls = []

  def wrapper(*args):
    calls.append(len(calls) + 1)
    if calls[-1] in fail_on and not after:
      raise RuntimeError(f"injected {name} fault at call {calls[-1]}")
    out = real(*args)
    if calls[-1] in fail_on and after:
      raise RuntimeError(f"injected {name} fault at call {calls[-1]}")
    return out

  monkeypatch.setattr(batch_step, name, wrapper)
  return calls


# -- non-finite values --------------------------------------------------------


def _routing_case(model, kind):
  """(layer-0 expert e, a prompt whose prefill (kind "prefill") or first
  decode step alone (kind "decode") routes to e, two prompts that never
  do). The first decode writes position 3: block 0 of its request."""
  prompts = np.random.default_rng(0).integers(0, 61, size=(16, PROMPT))
  out = generate(model, list(prompts), NEW, record_routing=True)
  ids = [[set(r[0, b].ravel().tolist()) for r in out.routing_ids]
         for b in range(len(prompts))]  # [request][pass] layer-0 experts
  for e in range(model.config.num_experts):
    bad = [b for b, passes in enumerate(ids)
           if (e in passes[0] if kind == "prefill" else
               e not in passes[0] and e in passes[1])]
    clean = [b for b, passes in enumerate(ids)
             if all(e not in experts for experts in passes)]
    if bad and len(clean) >= 2:
      return e, prompts[bad[0]], prompts[clean[0]], prompts[clean[1]]
  raise AssertionError(f"no layer-0 expert separates the prompts ({kind}).")


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_nan_expert_fails_its_request_alone(tiny_model, kind):
  expert, bad, beside, after = _routing_case(tiny_model, kind)
  model = MoEModel(get_config("tiny"), rngs=nnx.Rngs(0))  # = tiny_model
  gate = model.experts.gate[...]
  model.experts.gate[...] = gate.at[0, expert].set(jnp.nan)
  # "beside" runs with the bad request, which holds block 0: the padding of
  # every block table; "after" arrives once the bad one is gone and gets
  # its freed blocks.
  requests = [Request(bad, NEW, request_id="bad"),
              Request(beside, NEW, request_id="beside"),
              Request(after, NEW, request_id="after", arrival_step=6)]
  engine = Engine(model, None, **ENGINE)
  results = {r.request_id: r for r in engine.run(requests)}
  failed = results["bad"]
  assert failed.finish_reason == "error" and failed.tokens == []
  assert "non-finite logits" in failed.error and kind in failed.error
  _check_clean(engine, tiny_model, requests[1:],
               [results["beside"], results["after"]])
  # The bad request's blocks were scrubbed: no NaN is left for anyone.
  pool = engine.executor.pool
  assert np.isfinite(np.asarray(pool.k)).all()
  assert np.isfinite(np.asarray(pool.v)).all()


# -- bad request fields -------------------------------------------------------


def test_bad_seeds_fail_alone_without_leaking(tiny_model):
  good = _requests(2, seed=1)
  requests = [Request([1, 2], 3, seed=-1, request_id="neg"), good[0],
              Request([1, 2], 3, seed=2**32, request_id="big"), good[1]]
  engine = Engine(tiny_model, None, **ENGINE)
  results = engine.run(requests)
  for result in (results[0], results[2]):
    assert result.finish_reason == "error"
    assert "seed must be an integer in [0, 2**32)" in result.error
  _check_clean(engine, tiny_model, good, [results[1], results[3]])


# -- faults in the steps ------------------------------------------------------


def test_prefill_that_raises_once_is_retried(tiny_model, monkeypatch):
  requests = _requests(3, seed=2)
  calls = _inject(monkeypatch, "prefill_step", fail_on={2})
  engine = Engine(tiny_model, None, **ENGINE)
  results = engine.run(requests)
  assert len(calls) == 4  # three prefills, one of them twice
  _check_clean(engine, tiny_model, requests, results)
  assert engine.summary()["faults"] == 1


def test_prefill_that_keeps_raising_fails_its_request_alone(
    tiny_model, monkeypatch):
  requests = _requests(3, seed=3)
  requests[1].seed = 99  # greedy: the seed changes no token
  real = batch_step.prefill_step

  def wrapper(*args):
    if int(args[7].seed[0]) == 99:
      raise RuntimeError("injected prefill fault")
    return real(*args)

  monkeypatch.setattr(batch_step, "prefill_step", wrapper)
  engine = Engine(tiny_model, None, **ENGINE)
  results = engine.run(requests)
  failed = results[1]
  assert failed.finish_reason == "error" and failed.tokens == []
  assert "prefill raised 2 times" in failed.error
  assert "RuntimeError: injected prefill fault" in failed.error
  _check_clean(engine, tiny_model, [requests[0], requests[2]],
               [results[0], results[2]])


@pytest.mark.parametrize("after", [False, True],
                         ids=["before_donation", "after_donation"])
def test_decode_fault_keeps_the_engine_usable(tiny_model, monkeypatch,
                                              after):
  requests = _requests(3, seed=4)
  _inject(monkeypatch, "decode_step", fail_on={2}, after=after)
  engine = Engine(tiny_model, None, **ENGINE)
  results = engine.run(requests)
  _check_clean(engine, tiny_model, requests, results)
  # After the donated call the pool was rebuilt: every running request was
  # recomputed. Before it nothing was lost: the decode was just retried.
  assert engine.num_preemptions == (3 if after else 0)
  assert all(r.preemptions == int(after) for r in results)
  # New requests are served as well.
  later = _requests(1, seed=5)
  later[0].request_id = "later"
  _check_clean(engine, tiny_model, later, engine.run(later))


def test_decode_faults_in_a_row_fail_the_engine_once(tiny_model,
                                                     monkeypatch):
  requests = _requests(3, seed=6)
  requests[2].arrival_step = 50  # not yet submitted when the engine fails
  _inject(monkeypatch, "decode_step", fail_on={2, 3}, after=True)
  engine = Engine(tiny_model, None, **ENGINE)
  with pytest.raises(EngineFailedError, match="2 decode steps in a row") as e:
    engine.run(requests)
  assert "Failed requests (2): [0, 1]" in str(e.value)
  for request_id in (0, 1):
    result = engine.results[request_id]
    assert result.finish_reason == "error"
    assert "the engine failed" in result.error
    assert "injected decode_step fault" in result.error
  assert not engine.has_work and engine.allocator.num_in_use == 0
  # Resumed: the failed requests are not served again, the rest is.
  results = engine.run(requests)
  assert [r.finish_reason for r in results] == ["error", "error", "length"]
  _check_clean(engine, tiny_model, requests[2:], results[2:])


# -- the serving API ----------------------------------------------------------


def test_cancel_running_and_waiting(tiny_model):
  requests = _requests(3, seed=7)
  engine = Engine(tiny_model, None, **{**ENGINE, "max_batch": 1})
  for request in requests:
    engine.submit(request)
  engine.step()  # 0 prefills and decodes once; 1 and 2 wait
  assert engine.cancel(0) and engine.cancel(2)
  assert not engine.cancel(0)  # already finished
  with pytest.raises(KeyError, match="no request 'nope'"):
    engine.cancel("nope")
  while engine.has_work:
    engine.step()
  results = engine.results
  assert results[0].finish_reason == "cancelled"
  assert results[0].tokens == _reference(tiny_model, requests[0])[:2]
  assert results[2].finish_reason == "cancelled" and results[2].tokens == []
  _check_clean(engine, tiny_model, requests[1:2], [results[1]])


def test_deadline_finishes_with_tokens_so_far(tiny_model):
  now = [0.0]
  requests = _requests(3, seed=8)
  requests[0].deadline_s = 1.5  # expires at the start of the third step
  requests[2].deadline_s = 0.5  # waits (max_batch 2) and expires
  engine = Engine(tiny_model, None, clock=lambda: now[0],
                  **{**ENGINE, "max_batch": 2})

  def tick(record):
    now[0] += 1.0

  results = engine.run(requests, on_step=tick)
  assert results[0].finish_reason == "deadline"
  assert results[0].tokens == _reference(tiny_model, requests[0])[:3]
  assert results[2].finish_reason == "deadline" and results[2].tokens == []
  _check_clean(engine, tiny_model, requests[1:2], results[1:2])


def test_bounded_queue_refuses_then_run_holds_arrivals(tiny_model):
  requests = _requests(4, seed=9)
  engine = Engine(tiny_model, None, max_queue=2,
                  **{**ENGINE, "max_batch": 1})
  engine.submit(requests[0])
  engine.submit(requests[1])
  with pytest.raises(QueueFullError, match="max_queue=2"):
    engine.submit(requests[2])
  assert 2 not in engine.results  # refused: nothing recorded
  # run() waits for room instead of failing; 0 and 1 are already in.
  results = engine.run(requests)
  _check_clean(engine, tiny_model, requests, results)


def test_pop_finished_forgets_results(tiny_model):
  requests = _requests(2, seed=10)
  engine = Engine(tiny_model, None, **ENGINE)
  engine.run(requests[:1])
  engine.submit(requests[1])
  popped = engine.pop_finished()
  assert [r.request_id for r in popped] == [0]
  assert list(engine.results) == [1]  # the live one stays
  engine.run([])
  assert [r.request_id for r in engine.pop_finished()] == [1]
  assert engine.results == {}


def test_run_resumes_after_an_exception(tiny_model):
  requests = _requests(3, seed=12)
  for request in requests:
    request.request_id = None  # resumed by object, not by id
  requests[2].arrival_step = 3
  engine = Engine(tiny_model, None, **ENGINE)

  def interrupt(record):
    if record.step == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    engine.run(requests, on_step=interrupt)
  results = engine.run(requests)  # no "duplicate request_id", nothing twice
  assert len(engine.results) == 3
  _check_clean(engine, tiny_model, requests, results)


def test_run_never_spins_with_admission_paused(tiny_model):
  engine = Engine(tiny_model, None, **ENGINE)
  engine.admission_paused = True
  requests = _requests(1, seed=13)

  def spin_guard(record):
    assert record.step < 100, "run() spins without progress"

  with pytest.raises(RuntimeError, match="admission is paused"):
    engine.run(requests, on_step=spin_guard)
  engine.admission_paused = False
  _check_clean(engine, tiny_model, requests, engine.run(requests))
