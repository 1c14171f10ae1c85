"""Tests of wisp_jax/serving/engine.py (and batch_step.py)."""

import json

import chex
import jax
import numpy as np
import pytest

from wisp_jax.serving import batch_step
from wisp_jax.serving import scheduler
from wisp_jax.serving import step as step_lib
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.serving.generate import generate

# Small pools force preemptions; prompts + resumes fit one prefill bucket.
# Every engine here has the same shapes, so they share compiled steps.
ENGINE = dict(slots_per_layer=2, kv_blocks=10, block_size=4, max_batch=4,
              min_prefill_bucket=32)
# Reference runs share one total length and two prompt lengths, so
# `generate` compiles few steps.
TOTAL = 24


def _requests(lengths, seed=0, vocab=61, **kwargs):
  rng = np.random.default_rng(seed)
  return [Request(rng.integers(0, vocab, size=n), TOTAL - n, request_id=i,
                  **kwargs) for i, n in enumerate(lengths)]


def _reference(model, request):
  out = generate(model, [np.asarray(request.prompt)], request.max_new_tokens,
                 temperature=request.temperature, seed=request.seed)
  return out.tokens[0].tolist()


def test_paged_batched_preempted_output_equals_generate(tiny_model):
  # Each request needs up to 6 blocks of 4; 10 blocks hold fewer than two,
  # so running requests are preempted and re-prefilled.
  requests = _requests([5, 13, 5, 13, 13, 5])
  requests[3].arrival_step = 4
  # A sampled request: the same seed gives generate's samples.
  requests[4].temperature, requests[4].seed = 0.8, 7
  engine = Engine(tiny_model, None, **ENGINE)
  with jax.transfer_guard("disallow"):
    results = engine.run(requests)
  assert engine.num_preemptions >= 1
  assert sum(r.preemptions for r in results) == engine.num_preemptions
  for request, result in zip(requests, results):
    assert result.error is None and result.finish_reason == "length"
    assert result.tokens == _reference(tiny_model, request), request.request_id
  assert engine.allocator.num_in_use == 0
  assert engine.allocator.peak_in_use == 10
  pager = engine.expert_stats()
  assert pager["misses"] > 0 and pager["hits"] > 0
  assert pager["bytes_moved"] == pager["loads"] * 5760


def test_long_workload_finishes_with_bounded_compilation(
    tiny_model, tmp_path, monkeypatch):
  traces = []

  def counted(*args):
    traces.append(args[6].shape)  # the step's tokens [B, T]
    return step_lib.step_impl(*args)

  buckets = scheduler.powers_of_two_upto(ENGINE["max_batch"])
  monkeypatch.setattr(batch_step, "decode_step", step_lib.jit_step(
      chex.assert_max_traces(counted, n=len(buckets))))
  # 14 requests (more than the pool holds), arriving about one per step.
  rng = np.random.default_rng(3)
  lengths = rng.integers(2, 15, size=14)
  requests = _requests(lengths, seed=4)
  arrivals = np.cumsum(rng.poisson(1.0, size=len(requests)))
  for request, step in zip(requests, arrivals):
    request.arrival_step = int(step)
  engine = Engine(tiny_model, None, workdir=str(tmp_path), **ENGINE)
  results = engine.run(requests)
  engine.close()

  for request, result in zip(requests, results):
    assert result.ok, result.error
    assert len(result.tokens) == request.max_new_tokens
    assert result.ttft_s >= 0 and result.latency_s >= result.ttft_s
  assert engine.num_preemptions >= 1
  assert engine.allocator.num_in_use == 0
  assert engine.allocator.peak_in_use <= 10
  # One trace per batch bucket used, however many steps ran.
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  used = {l["batch_bucket"] for l in lines if l["batch_size"]}
  assert len(lines) > 3 * len(buckets)
  assert len(used) >= 2 and used <= set(buckets)
  assert sorted(shape[0] for shape in traces) == sorted(used)
  # And one compiled executable per bucket (no recompiles either).
  assert batch_step.decode_step._cache_size() == len(used)
  assert {l["step"] for l in lines} <= set(range(engine.step_count))
  assert max(l["kv_blocks_peak"] for l in lines) <= 10
  assert sum(l["preemptions"] for l in lines) == engine.num_preemptions
  assert lines[-1]["preemptions_total"] == engine.num_preemptions
  assert sum(l["pager_loads"] for l in lines) == engine.expert_stats()["loads"]
  assert all(l["pager_bytes"] == l["pager_loads"] * 5760 for l in lines)


def test_bad_requests_fail_alone(tiny_model):
  good = _requests([5, 13], seed=5)
  reference = _reference(tiny_model, good[0])
  stop_at = reference[2]
  stopping = Request(good[0].prompt, good[0].max_new_tokens,
                     stop_token=stop_at, request_id="stop")
  requests = [
      Request(np.zeros(250, np.int32), 10, request_id="long"),
      good[0],
      Request([1, 2, 61], 4, request_id="vocab"),
      Request([], 4, request_id="empty"),
      Request("text", 4, request_id="text"),
      good[1],
      stopping,
  ]
  engine = Engine(tiny_model, None, **ENGINE)
  results = {r.request_id: r for r in engine.run(requests)}
  long = results["long"]
  assert long.finish_reason == "error" and long.tokens == []
  assert "250 + max_new_tokens 10 = 260 exceeds" in long.error
  assert "max_seq_len=256" in long.error
  assert "[0, 61)" in results["vocab"].error
  assert "empty" in results["empty"].error
  assert "sequence of integer token ids" in results["text"].error
  assert results[0].tokens == reference
  assert results[1].tokens == _reference(tiny_model, good[1])
  # A prefix of the reference up to and including the first stop token.
  first_stop = reference.index(stop_at)
  assert results["stop"].tokens == reference[:first_stop + 1]
  assert results["stop"].finish_reason == "stop"
  # A request longer than the pool fails alone, too.
  small = Engine(tiny_model, None, **{**ENGINE, "kv_blocks": 5})
  out = small.run([Request(np.ones(20, np.int32), 4)])[0]
  assert "needs 6 KV blocks of 4 positions (23 positions) but the pool has 5" \
      in out.error
  with pytest.raises(ValueError, match="duplicate request_id"):
    engine.submit(Request([1], 1, request_id=0))


def test_lone_request_pages_like_generate(tiny_model):
  """Prefill padding and batch padding add no expert demand: a lone request
  sees the pager traffic of `generate` with the same paged source."""
  request = _requests([13], seed=6)[0]  # prefilled in a bucket of 32
  engine = Engine(tiny_model, None, **ENGINE)
  result = engine.run([request])[0]
  out = generate(tiny_model, [np.asarray(request.prompt)],
                 request.max_new_tokens, experts="paged", slots_per_layer=2)
  assert result.tokens == out.tokens[0].tolist()
  pager = engine.expert_stats()
  assert pager["hits_per_layer"] == out.stats.hits.tolist()
  assert pager["misses_per_layer"] == out.stats.misses.tolist()
  assert pager["loads"] == int(out.stats.loads.sum())
