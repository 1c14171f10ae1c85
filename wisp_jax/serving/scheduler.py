"""The serving engine's host side: admission, KV blocks, preemption, buckets.

Pure Python and NumPy, no JAX: the `Scheduler` decides what each engine step
runs; the `serving.executor.Executor` runs it on the device. Each step
(1) admits waiting requests in arrival order while the batch has room and
the pool has the blocks of their context and first decode token (beyond the
blocks the running requests take in this step); each admitted request is
prefilled alone (padded to a length bucket) and samples its next token;
then (2) every running request decodes one token, padded to a batch bucket.
A request that needs a new block when the pool is empty preempts the most
recently admitted request: its blocks are freed and it goes back to the
head of the queue, keeping its tokens; when readmitted it re-prefills
prompt + tokens so far (preemption by recompute). Finished requests free
their blocks at once.

Nothing submitted is ever lost: every request ends with a result whose
`finish_reason` says how ("length", "stop", "error", "cancelled",
"deadline"), and whatever ends it frees its blocks. A prefill that raises
frees the request's blocks and requeues it once (`prefill_failed`); a row
whose logits are not finite fails alone and its blocks are handed back to
be scrubbed. The queue may be bounded (`max_queue`: `submit` raises
`QueueFullError`); preempted requests return to it regardless.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from wisp_jax.models.config import MoEConfig
from wisp_jax.serving.blocks import BlockAllocator, blocks_for
from wisp_jax.serving.request import (Request, id_error, prompt_array,
                                      validate_request)
from wisp_jax.serving.stats import RequestResult

# Prefill attempts of one request before a fault fails it alone.
PREFILL_ATTEMPTS = 2


class QueueFullError(RuntimeError):
  """`submit` refused a request: the waiting queue is at `max_queue`."""


def powers_of_two_upto(limit: int, start: int = 1) -> tuple[int, ...]:
  """`start, 2 start, 4 start, ...` below `limit`, then `limit` itself."""
  if limit < 1 or start < 1:
    raise ValueError(f"bucket limits must be >= 1, got {start}..{limit}.")
  buckets, size = [], start
  while size < limit:
    buckets.append(size)
    size *= 2
  buckets.append(limit)
  return tuple(buckets)


def bucket_for(size: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `size`."""
  for bucket in buckets:
    if bucket >= size:
      return bucket
  raise ValueError(f"size {size} exceeds the largest bucket {buckets[-1]}.")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of a device step, as the scheduler describes it.

  Attributes:
    tokens: the row's new tokens.
    blocks: its KV blocks, in position order.
    length: positions it already holds in the pool.
    seed: sampling seed.
    counter: folded into the sampling key for this token.
    temperature: 0 for greedy.
  """
  tokens: Sequence[int]
  blocks: Sequence[int]
  length: int
  seed: int
  counter: int
  temperature: float


@dataclasses.dataclass(eq=False)
class LiveRequest:
  """An admitted or waiting request and what the engine holds for it."""
  request: Request
  result: RequestResult
  prompt: np.ndarray
  generated: list[int] = dataclasses.field(default_factory=list)
  blocks: list[int] = dataclasses.field(default_factory=list)
  kv_len: int = 0  # positions of this request in the pool
  faults: int = 0  # prefills of this request that raised

  @property
  def context(self) -> np.ndarray:
    return np.concatenate([self.prompt, np.asarray(self.generated, np.int32)])

  def counter(self) -> int:
    """Sampling counter of the next token (as `generate` for one prompt)."""
    n = len(self.generated)
    return 0 if n == 0 else len(self.prompt) + n - 1

  def row(self, tokens, length: int) -> Row:
    return Row(tokens=tokens, blocks=self.blocks, length=length,
               seed=self.request.seed, counter=self.counter(),
               temperature=self.request.temperature)


class Scheduler:
  """Requests, KV blocks and preemption of one engine (host only)."""

  def __init__(self, config: MoEConfig, kv_blocks: int, block_size: int,
               max_batch: int, clock: Callable[[], float],
               max_queue: int | None = None):
    for name, value in (("kv_blocks", kv_blocks), ("block_size", block_size),
                        ("max_batch", max_batch)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    if max_queue is not None and max_queue < 1:
      raise ValueError(f"max_queue must be None (unbounded) or >= 1, got "
                       f"{max_queue}.")
    self.max_queue = max_queue
    self.config = config
    self.block_size, self.max_batch = int(block_size), int(max_batch)
    self.allocator = BlockAllocator(kv_blocks)
    self.clock = clock
    self.step_count = 0
    self.num_preemptions = 0
    # While True, waiting requests are not admitted (a draining barrier).
    self.admission_paused = False
    self.kv_peak_replaced = 0  # peak blocks in use of replaced pools
    self.blocks_reclaimed = 0  # blocks held by no request, taken back
    self.results: dict[Any, RequestResult] = {}
    self.waiting: collections.deque[LiveRequest] = collections.deque()
    self.running: list[LiveRequest] = []  # in admission order
    self._next_id = 0

  # -- requests ----------------------------------------------------------------

  def submit(self, request: Request) -> RequestResult:
    """Queues `request` (it arrives now); returns its live result.

    An invalid request is not queued: its result carries the error (one
    with an unhashable id is not recorded in `results` either).

    Raises:
      ValueError: a request with this id was submitted before.
      QueueFullError: `max_queue` requests are waiting (nothing recorded;
        submit it again once some are admitted).
    """
    error = id_error(request)
    if error is not None:
      result = RequestResult(request_id=request.request_id, prompt_length=0,
                             arrival_time=self.clock(),
                             arrival_step=self.step_count)
      self.fail(result, error)
      return result
    if request.request_id is None:
      request = dataclasses.replace(request, request_id=self._next_id)
    self._next_id += 1
    if request.request_id in self.results:
      raise ValueError(f"duplicate request_id {request.request_id!r}.")
    if self.queue_full:
      raise QueueFullError(
          f"the queue is full: {len(self.waiting)} requests wait "
          f"(max_queue={self.max_queue}); submit request "
          f"{request.request_id!r} again after some are admitted.")
    prompt, error = prompt_array(request.prompt)
    result = RequestResult(request_id=request.request_id,
                           prompt_length=int(prompt.size),
                           arrival_time=self.clock(),
                           arrival_step=self.step_count)
    self.results[request.request_id] = result
    error = error or validate_request(request, prompt, self.config,
                                      self.block_size,
                                      self.allocator.num_blocks)
    if error is not None:
      self.fail(result, error)
      return result
    self.waiting.append(LiveRequest(request, result, prompt.astype(np.int32)))
    return result

  @property
  def queue_full(self) -> bool:
    return self.max_queue is not None and len(self.waiting) >= self.max_queue

  def fail(self, result: RequestResult, error: str) -> None:
    """Marks a request that holds no blocks (not queued) as failed."""
    result.error, result.finish_reason = error, "error"
    result.tokens = []
    result.finish_time, result.finish_step = self.clock(), self.step_count

  def finish(self, seq: LiveRequest, reason: str,
             error: str | None = None) -> list[int]:
    """Ends a live request (running or waiting) for `reason`; frees and
    returns its blocks. A failed request reports no tokens; any other keeps
    its tokens so far."""
    if seq in self.running:
      self.running.remove(seq)
    elif seq in self.waiting:
      self.waiting.remove(seq)
    freed, seq.blocks = seq.blocks, []
    self.allocator.free(freed)
    result = seq.result
    result.tokens = [] if error is not None else list(seq.generated)
    result.error, result.finish_reason = error, reason
    result.finish_time, result.finish_step = self.clock(), self.step_count
    return freed

  def live(self, request_id) -> LiveRequest | None:
    """The running or waiting request with this id, or None."""
    for seq in self.running + list(self.waiting):
      if seq.request.request_id == request_id:
        return seq
    return None

  def cancel(self, request_id) -> bool:
    """Stops a running or waiting request (finish_reason "cancelled", its
    tokens so far); False if it already finished.

    Raises:
      KeyError: no such request was submitted (or its result was popped).
    """
    seq = self.live(request_id)
    if seq is None:
      if request_id not in self.results:
        raise KeyError(f"no request {request_id!r} was submitted (or its "
                       "result was already popped).")
      return False
    self.finish(seq, "cancelled")
    return True

  def expire(self) -> list[LiveRequest]:
    """Finishes the live requests past their deadline (finish_reason
    "deadline", tokens so far); returns them."""
    now = self.clock()
    expired = [seq for seq in self.running + list(self.waiting)
               if seq.request.deadline_s is not None and
               now - seq.result.arrival_time >= seq.request.deadline_s]
    for seq in expired:
      self.finish(seq, "deadline")
    return expired

  def fail_all(self, error: str) -> list[LiveRequest]:
    """Fails every live request with `error`; returns them."""
    live = self.running + list(self.waiting)
    for seq in live:
      self.finish(seq, "error", error)
    return live

  def pop_finished(self) -> list[RequestResult]:
    """Returns the finished results (in submission order) and forgets
    them."""
    done = [r for r in self.results.values() if r.finish_reason is not None]
    for result in done:
      del self.results[result.request_id]
    return done

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  # -- admission -----------------------------------------------------------

  def _reserved(self) -> int:
    """Blocks the running requests take in this step's decode."""
    return sum(seq.kv_len == len(seq.blocks) * self.block_size
               for seq in self.running)

  def admit_next(self) -> LiveRequest | None:
    """Pops the head of the queue and gives it its blocks, if it fits.

    Admission leaves free the blocks the running requests take in this
    step's decode, so admitting never forces a preemption at once. The
    caller prefills the returned request and reports with `prefilled`.
    """
    if (self.admission_paused or not self.waiting or
        len(self.running) >= self.max_batch):
      return None
    seq = self.waiting[0]
    # Room for the context and the first decode token (never past the last
    # position the request writes).
    last = seq.prompt.size + seq.request.max_new_tokens - 1
    need = blocks_for(min(seq.context.size + 1, last), self.block_size)
    if not self.allocator.can_alloc(need + self._reserved()):
      return None
    self.waiting.popleft()
    seq.blocks = self.allocator.alloc(need)
    return seq

  def prefilled(self, seq: LiveRequest, token: int,
                finite: bool = True) -> list[int]:
    """Records the prefill of `seq` and its sampled token; returns the
    blocks to scrub (those of a request whose logits were not finite, which
    fails alone)."""
    if not finite:
      return self.finish(seq, "error", _non_finite(seq, "prefill"))
    seq.kv_len = int(seq.context.size)
    if not self.append(seq, token):
      self.running.append(seq)
    return []

  def prefill_failed(self, seq: LiveRequest, error: str | None) -> bool:
    """A prefill of admitted `seq` raised: frees its blocks, and requeues
    it at the head of the queue (True) unless it already used its
    `PREFILL_ATTEMPTS`, when it fails with `error` (False). `error` None
    (an interrupt, not the request's fault) requeues it uncharged."""
    seq.faults += error is not None
    if seq.faults >= PREFILL_ATTEMPTS:
      self.finish(seq, "error", f"the prefill raised {seq.faults} times; "
                  f"last: {error}")
      return False
    self.allocator.free(seq.blocks)
    seq.blocks, seq.kv_len = [], 0
    self.waiting.appendleft(seq)
    return True

  def unblock(self) -> None:
    """Never spins: with nothing running and nothing admitted, the head of
    the queue cannot be served (it cannot happen for validated requests).

    Blocks held while nothing runs belong to no request (a leak): they are
    taken back (counted in `blocks_reclaimed`) and the head is admitted at
    the next step instead.
    """
    if (not self.running and self.waiting and not self.admission_paused):
      if self.allocator.num_in_use:
        self.blocks_reclaimed += self.allocator.num_in_use
        peak = self.allocator.peak_in_use
        self.allocator = BlockAllocator(self.allocator.num_blocks)
        self.allocator.peak_in_use = peak
        return
      seq = self.waiting.popleft()
      self.fail(seq.result, "the request does not fit in the KV pool of "
                f"{self.allocator.num_blocks} blocks.")

  # -- tokens ----------------------------------------------------------------

  def append(self, seq: LiveRequest, token: int) -> bool:
    """Records a sampled token; finishes the request if done. True if done."""
    seq.generated.append(int(token))
    result, request = seq.result, seq.request
    if result.first_token_time is None:
      result.first_token_time = self.clock()
    stop = request.stop_token is not None and token == request.stop_token
    if not stop and len(seq.generated) < request.max_new_tokens:
      return False
    self.finish(seq, "stop" if stop else "length")
    return True

  # -- decode and preemption -----------------------------------------------

  def preempt(self, victim: LiveRequest) -> None:
    self.running.remove(victim)
    self.allocator.free(victim.blocks)
    victim.blocks, victim.kv_len = [], 0
    victim.result.preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(victim)

  def decode_batch(self) -> list[LiveRequest]:
    """The requests that decode this step, each with room for one more
    position (preempting the most recently admitted while the pool is
    empty)."""
    i = 0
    while i < len(self.running):
      seq = self.running[i]
      if seq.kv_len == len(seq.blocks) * self.block_size:
        while not self.allocator.can_alloc(1):
          victim = self.running[-1]
          self.preempt(victim)
          if victim is seq:  # it was the newest: nothing after it
            return list(self.running)
        seq.blocks = seq.blocks + self.allocator.alloc(1)
      i += 1
    return list(self.running)

  def decoded(self, batch: Sequence[LiveRequest], tokens,
              finite=None) -> list[int]:
    """Records one decode step's sampled tokens; returns the blocks to
    scrub (those of the rows whose logits were not finite: each such
    request fails alone)."""
    dirty = []
    for i, (seq, token) in enumerate(zip(batch, tokens)):
      if finite is not None and not finite[i]:
        dirty += self.finish(seq, "error", _non_finite(seq, "decode"))
        continue
      seq.kv_len += 1
      self.append(seq, token)
    return dirty

  def drain(self) -> int:
    """Preempts every running request by recompute (they return to the head
    of the queue in admission order, keeping their tokens); returns how
    many."""
    running = list(self.running)
    for seq in reversed(running):
      self.preempt(seq)
    return len(running)

  def largest_queued_need(self) -> int:
    """KV blocks of the largest live request at its full length."""
    return max([blocks_for(seq.prompt.size + seq.request.max_new_tokens - 1,
                           self.block_size)
                for seq in self.running + list(self.waiting)], default=1)

  def replace_pool(self, kv_blocks: int) -> None:
    """A new (empty) block pool of `kv_blocks` (nothing may be running)."""
    if self.running:
      raise RuntimeError("replace the pool only at a drained barrier.")
    self.kv_peak_replaced = self.kv_blocks_peak
    self.allocator = BlockAllocator(kv_blocks)

  @property
  def kv_blocks_peak(self) -> int:
    """Most KV blocks ever in use at once (over every pool size)."""
    return max(self.kv_peak_replaced, self.allocator.peak_in_use)


def _non_finite(seq: LiveRequest, kind: str) -> str:
  return (f"non-finite logits (NaN or inf) in the {kind} of request "
          f"{seq.request.request_id!r} after {len(seq.generated)} tokens; "
          "the model produced garbage for it (a non-finite weight or an "
          "overflow), so it fails alone and its KV blocks are scrubbed.")
