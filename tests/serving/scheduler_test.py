"""Tests of wisp_jax/serving/scheduler.py: host-only, no JAX imported."""

import subprocess
import sys

import numpy as np
import pytest

from wisp_jax.models.config import get_config
from wisp_jax.serving.request import Request
from wisp_jax.serving.scheduler import (QueueFullError, Scheduler,
                                        bucket_for, powers_of_two_upto)

CONFIG = get_config("tiny")  # max_seq_len 256


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    self.now += 1.0
    return self.now


def _scheduler(kv_blocks=4, block_size=4, max_batch=2, max_queue=None):
  return Scheduler(CONFIG, kv_blocks, block_size, max_batch, Clock(),
                   max_queue)


def test_imports_no_jax():
  code = ("import sys, wisp_jax.serving.scheduler; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('jax', 'jaxlib', 'flax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "[]"


def test_buckets():
  assert powers_of_two_upto(8) == (1, 2, 4, 8)
  assert powers_of_two_upto(6) == (1, 2, 4, 6)
  assert powers_of_two_upto(256, 16) == (16, 32, 64, 128, 256)
  assert bucket_for(3, (1, 2, 4, 6)) == 4
  with pytest.raises(ValueError, match="exceeds the largest bucket 6"):
    bucket_for(7, (1, 2, 4, 6))


def test_admission_in_order_with_room_for_the_first_token():
  s = _scheduler(kv_blocks=4, block_size=4, max_batch=2)
  s.submit(Request([1] * 5, 3, request_id="a"))  # 5 + 1 positions: 2 blocks
  s.submit(Request([1] * 2, 3, request_id="b"))  # 3 positions: 1 block
  s.submit(Request([1] * 2, 3, request_id="c"))
  a = s.admit_next()
  assert a.request.request_id == "a" and a.blocks == [0, 1]
  s.prefilled(a, 7)
  b = s.admit_next()
  assert b.request.request_id == "b" and b.blocks == [2]
  s.prefilled(b, 7)
  assert s.admit_next() is None  # the batch is full (max_batch=2)
  assert [x.request.request_id for x in s.running] == ["a", "b"]
  assert a.kv_len == 5 and a.generated == [7]
  assert a.counter() == 5  # prompt length + 1 - 1


def test_decode_preempts_the_newest_when_the_pool_is_empty():
  s = _scheduler(kv_blocks=3, block_size=2, max_batch=2)
  # Admitted with room for the context and one token: 2 blocks, 1 block.
  assert s.submit(Request([1, 2, 3], 3, request_id="old")).error is None
  assert s.submit(Request([4], 3, request_id="new")).error is None
  for _ in range(2):
    seq = s.admit_next()
    s.prefilled(seq, 0)
  assert s.allocator.num_free == 0
  # "old" holds 3 of its 4 positions after one decode, then needs block 3:
  batch = s.decode_batch()
  assert [x.request.request_id for x in batch] == ["old", "new"]
  s.decoded(batch, [5, 6])
  batch = s.decode_batch()
  # "old" needed a block: "new" (admitted last) was preempted for it.
  assert [x.request.request_id for x in batch] == ["old"]
  assert s.num_preemptions == 1
  new = s.waiting[0]
  assert new.request.request_id == "new" and new.blocks == []
  assert new.generated == [0, 6] and new.result.preemptions == 1
  # Readmitted later with its tokens so far as context.
  assert list(new.context) == [4, 0, 6]


def test_finish_frees_blocks_and_records_the_result():
  s = _scheduler()
  result = s.submit(Request([1, 2], 2, stop_token=9, request_id="r"))
  seq = s.admit_next()
  s.prefilled(seq, 3)
  s.decoded(s.decode_batch(), [9])  # the stop token ends it
  assert result.tokens == [3, 9] and result.finish_reason == "stop"
  assert s.allocator.num_in_use == 0 and not s.has_work
  assert result.ttft_s > 0 and result.latency_s >= result.ttft_s


def test_invalid_requests_fail_alone_and_duplicates_are_refused():
  s = _scheduler()
  bad = s.submit(Request([1, 2, 999], 2))
  assert bad.finish_reason == "error" and "token ids" in bad.error
  assert not s.waiting
  s.submit(Request([1], 2, request_id="x"))
  with pytest.raises(ValueError, match="duplicate request_id 'x'"):
    s.submit(Request([1], 2, request_id="x"))


def test_drain_and_replace_pool():
  s = _scheduler(kv_blocks=4, block_size=4, max_batch=2)
  for i in range(2):
    s.submit(Request([1, 2], 4, request_id=i))
    s.prefilled(s.admit_next(), 0)
  with pytest.raises(RuntimeError, match="drained barrier"):
    s.replace_pool(8)
  assert s.drain() == 2
  assert [x.request.request_id for x in s.waiting] == [0, 1]
  s.replace_pool(8)
  assert s.allocator.num_blocks == 8 and s.kv_blocks_peak == 2
  assert s.largest_queued_need() == 2  # 2 + 4 - 1 positions of 4


@pytest.mark.parametrize("field, value, why", [
    ("seed", -1, "seed must be an integer in [0, 2**32)"),
    ("seed", 2**32, "seed must be an integer in [0, 2**32)"),
    ("seed", 1.0, "seed must be an integer"),
    ("seed", True, "seed must be an integer"),
    ("max_new_tokens", 2.0, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", True, "max_new_tokens must be an integer >= 1"),
    ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("temperature", -0.5, "temperature must be a finite number >= 0"),
    ("temperature", "hot", "temperature must be a finite number"),
    ("stop_token", 61, "stop_token must be None or an integer token id"),
    ("stop_token", 3.0, "stop_token must be None or an integer token id"),
    ("deadline_s", 0, "deadline_s must be None or a number of seconds > 0"),
    ("deadline_s", float("nan"), "deadline_s must be None or a number"),
    ("arrival_step", -2, "arrival_step must be an integer >= 0"),
])
def test_every_field_is_validated_up_front(field, value, why):
  s = _scheduler()
  request = Request([1, 2], 2, request_id="r")
  setattr(request, field, value)
  result = s.submit(request)
  assert result.finish_reason == "error" and why in result.error
  assert repr(value) in result.error
  assert not s.waiting and s.allocator.num_in_use == 0


def test_numpy_integers_are_accepted():
  s = _scheduler()
  result = s.submit(Request([1, 2], np.int64(2), seed=np.uint32(2**32 - 1),
                            stop_token=np.int32(5), request_id="r"))
  assert result.error is None and len(s.waiting) == 1


def test_unhashable_id_fails_without_being_recorded():
  s = _scheduler()
  result = s.submit(Request([1, 2], 2, request_id=["a"]))
  assert result.finish_reason == "error"
  assert "request_id must be hashable" in result.error
  assert s.results == {} and not s.waiting


def test_a_failed_prefill_frees_its_blocks_and_requeues_once():
  s = _scheduler(kv_blocks=4, block_size=4)
  s.submit(Request([1] * 5, 3, request_id="a"))
  s.submit(Request([1], 3, request_id="b"))
  seq = s.admit_next()
  assert seq.blocks == [0, 1]
  assert s.prefill_failed(seq, "RuntimeError: boom")
  assert s.allocator.num_in_use == 0 and seq.blocks == []
  assert [x.request.request_id for x in s.waiting] == ["a", "b"]
  seq = s.admit_next()
  assert not s.prefill_failed(seq, "RuntimeError: boom")
  assert seq.result.finish_reason == "error"
  assert "prefill raised 2 times; last: RuntimeError: boom" in \
      seq.result.error
  assert s.allocator.num_in_use == 0
  assert [x.request.request_id for x in s.waiting] == ["b"]


def test_unblock_reclaims_blocks_no_request_holds():
  s = _scheduler(kv_blocks=4, block_size=4, max_batch=2)
  s.submit(Request([1] * 9, 3, request_id="a"))  # 3 blocks
  s.allocator.alloc(2)  # leaked: held by no request
  assert s.admit_next() is None
  s.unblock()
  assert s.blocks_reclaimed == 2 and s.allocator.num_in_use == 0
  assert s.results["a"].error is None  # not failed for the leak
  assert s.admit_next().blocks == [0, 1, 2]


def test_cancel_expire_and_pop_finished():
  s = _scheduler(kv_blocks=8, block_size=4, max_batch=1)
  s.submit(Request([1, 2], 4, request_id="run"))
  s.submit(Request([1, 2], 4, request_id="wait"))
  s.submit(Request([1, 2], 4, request_id="late", deadline_s=2.5))
  s.prefilled(s.admit_next(), 7)
  assert s.cancel("run") and not s.cancel("run")
  with pytest.raises(KeyError, match="no request 'other'"):
    s.cancel("other")
  assert s.results["run"].finish_reason == "cancelled"
  assert s.results["run"].tokens == [7]
  assert s.allocator.num_in_use == 0
  # The clock ticks once per call: "late" arrived at 3 and now it is > 5.5.
  assert [x.request.request_id for x in s.expire()] == ["late"]
  assert s.results["late"].finish_reason == "deadline"
  done = s.pop_finished()
  assert [r.request_id for r in done] == ["run", "late"]
  assert list(s.results) == ["wait"]


def test_a_full_queue_refuses_submissions():
  s = _scheduler(max_queue=1)
  s.submit(Request([1], 2, request_id="a"))
  with pytest.raises(QueueFullError, match="max_queue=1"):
    s.submit(Request([1], 2, request_id="b"))
  assert list(s.results) == ["a"]
  s.prefilled(s.admit_next(), 0)
  assert s.submit(Request([1], 2, request_id="b")).error is None
