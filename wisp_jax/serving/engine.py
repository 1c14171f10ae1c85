"""Continuous-batching serving engine over a paged KV pool and expert pager.

The engine joins two parts, split the way vLLM splits them:

- `serving.scheduler.Scheduler` (host only, no JAX): admission in arrival
  order, KV block reservation, preemption by recompute, finished requests
  (see its docstring for the rules);
- `serving.executor.Executor`: the device state (parameters, expert
  source, KV pool) and the one jitted step, shared with `generate`.

A request's sampling key is fixed by the request alone (see
`serving.step`), so batching and preemption leave its tokens those of
`generate` on the request by itself (the recomputed keys and values can
differ from the incremental ones only by float rounding). One expert source
(pager state and slots) serves every step of the engine.

Results per request: tokens, TTFT, decode tokens/s, latency, error. A
request that cannot be served (too long, bad token ids, any field out of
range: see `serving.request.validate_request`) fails alone: the error is
recorded on it and the others run. Each step returns (and writes to
`metrics.jsonl`) a `StepMetrics`.

No request is lost, and no request corrupts another:

- Every submitted request ends with a result; its `finish_reason` is
  "length", "stop", "error", "cancelled" or "deadline", and whatever ends
  it frees its KV blocks.
- Finiteness: the step returns a per-row flag; a request whose logits are
  not finite (a NaN expert weight, an overflow) fails alone with
  finish_reason "error", and its blocks are zeroed before they are freed.
  Attention zeroes the values of positions no query sees, so stale blocks
  cannot leak into another request either way.
- Step faults: a prefill that raises frees the request's blocks and
  requeues it once; a second failed prefill fails it alone, with the
  exception in its error. A decode that raises is retried at the next
  step. If a fault came after the jitted call donated the KV pool and the
  expert carry, both are rebuilt (`Executor.recover`: a zeroed pool, and a
  fresh carry built as at construction, so paged residency restarts cold)
  and every running request is preempted by recompute (it keeps its tokens
  and re-prefills). Two decode faults in a row (no decode succeeding in
  between) fail the engine loudly: every in-flight request fails with the
  reason in its result and `step` raises `EngineFailedError` once; the
  engine, emptied and rebuilt, accepts new requests.

Serving API beyond `submit`/`step`/`run`:

- `cancel(request_id)`: a running or waiting request stops, frees its
  blocks and finishes with finish_reason "cancelled" and its tokens so far.
- Deadlines: `Request.deadline_s` counts from the request's arrival on the
  engine's clock; at the start of each step an expired request finishes
  with finish_reason "deadline" and its tokens so far.
- Backpressure: with `max_queue`, `submit` raises `QueueFullError` while
  that many requests wait (preempted ones return regardless); `run` holds
  its arrivals back until there is room.
- `pop_finished()` returns the finished results and forgets them, so
  `results` stays bounded on a long-lived engine (a popped id may be
  submitted again).
- `run` is resumable: called again after it raised, it does not submit
  again the requests already submitted (the same objects, or the same
  `request_id`), waits for them, and returns every result in order. It
  never spins: a step that can make no progress (admission paused with
  nothing running) raises a clear error instead.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from wisp_jax.alloc.split import Split
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging.pager import check_capacity
from wisp_jax.paging.sources import SOURCES
from wisp_jax.serving import scheduler as scheduler_lib
from wisp_jax.serving.budget import DeviceBudget
from wisp_jax.serving.executor import Executor
from wisp_jax.serving.request import Request, arrival_of, id_error
from wisp_jax.serving.scheduler import QueueFullError
from wisp_jax.serving.stats import MetricsWriter, RequestResult, StepMetrics

__all__ = ["Engine", "EngineFailedError", "QueueFullError", "Request"]

# Decode faults in a row (no decode succeeding in between) that fail the
# engine.
FAULTS_TO_FAIL = 2


class EngineFailedError(RuntimeError):
  """Steps kept raising: every in-flight request failed (see `Engine`)."""


def _describe(error: BaseException) -> str:
  return f"{type(error).__name__}: {error}"


class Engine:
  """Serves requests with continuous batching; see the module docstring."""

  def __init__(self, model: MoEModel, budget: DeviceBudget | None,
               slots_per_layer=None, kv_blocks: int = 64,
               block_size: int = 16, max_batch: int = 8, *,
               experts: str = "paged", policy: str = "lru",
               policy_options: dict | None = None, hot_set=None,
               min_prefill_bucket: int = 16, num_slots: int | None = None,
               workdir: str | None = None,
               clock: Callable[[], float] = time.perf_counter,
               max_queue: int | None = None, compressed_bank: bool = False):
    """Builds the pools and the expert source.

    Args:
      model: the MoE model.
      budget: device budget the split must fit (checked here), or None.
      slots_per_layer: expert slots per layer (int or `[L]`) for `paged`.
      kv_blocks: blocks in the KV pool.
      block_size: token positions per KV block.
      max_batch: most requests decoded together; decode batch buckets are
        the powers of two below it, and it.
      experts: expert source: `paged`, `resident`, `transient` or
        `static_offload`.
      policy: paging policy (`paged`).
      policy_options: the policy's options.
      hot_set: `[L, S]` experts of the `pinned` policy.
      min_prefill_bucket: smallest prefill length bucket; buckets double up
        to the model's max_seq_len.
      num_slots: slot rows per layer in the device buffer (`paged`; default
        the largest capacity): the most slots a later `resize` may give a
        layer.
      workdir: where `metrics.jsonl` goes (one line per step), or None.
      clock: time source in seconds (arrivals, deadlines, latencies).
      max_queue: most waiting requests `submit` accepts (None: unbounded).
      compressed_bank: keep the host bank exponent-coded
        (`paging.bank.make_compressed_bank`, bf16 models): fewer bytes per
        copy, decoded on the device; outputs are unchanged.
    """
    config = model.config
    self.model, self.config = model, config
    self.experts = experts
    self.scheduler = scheduler_lib.Scheduler(config, kv_blocks, block_size,
                                             max_batch, clock, max_queue)
    if experts not in SOURCES:
      raise ValueError(f"unknown expert source {experts!r}; known sources: "
                       f"{', '.join(SOURCES)}.")
    if experts == "paged":
      slots = paging_api.validate_slots(config, slots_per_layer)
    elif experts == "resident":
      slots = np.full((config.num_layers,), config.num_experts)
    else:  # transient scratch: one token's experts per layer at least.
      slots = np.full((config.num_layers,), config.top_k)
    self.split = Split.make(slots, kv_blocks, config.num_layers)
    self.budget_usage = None
    if budget is not None:
      if budget.footprint is None:
        budget = budget.for_model(model, block_size)
      self.budget_usage = budget.check(self.split)
    self.budget = budget
    self.executor = Executor(
        model, kv_blocks, block_size, experts=experts,
        slots_per_layer=slots_per_layer, policy=policy,
        policy_options=policy_options, hot_set=hot_set, num_slots=num_slots,
        compressed_bank=compressed_bank)
    self.spec = self.executor.spec
    self.num_slots = self.executor.num_slots
    self.bytes_per_expert = self.executor.bytes_per_expert
    self.batch_buckets = scheduler_lib.powers_of_two_upto(max_batch)
    self.prefill_buckets = scheduler_lib.powers_of_two_upto(
        config.max_seq_len, min(min_prefill_bucket, config.max_seq_len))
    self.clock = clock
    self.metrics = MetricsWriter(workdir)
    self._start_time = clock()
    self.num_faults = 0  # step faults recovered, all steps
    self._decode_faults = 0  # decode faults since the last good decode
    self._step_faults = 0  # faults of the step in progress
    self._failure: EngineFailedError | None = None
    # The requests `run` submitted, by object id, while a run is unfinished
    # (so a resumed run does not submit them again).
    self._run_submitted: dict[int, tuple[Request, RequestResult]] = {}

  # -- the scheduler's state, read through ---------------------------------

  @property
  def allocator(self):
    return self.scheduler.allocator

  @property
  def block_size(self) -> int:
    return self.scheduler.block_size

  @property
  def max_batch(self) -> int:
    return self.scheduler.max_batch

  @property
  def results(self) -> dict[Any, RequestResult]:
    return self.scheduler.results

  @property
  def step_count(self) -> int:
    return self.scheduler.step_count

  @property
  def num_preemptions(self) -> int:
    return self.scheduler.num_preemptions

  @property
  def admission_paused(self) -> bool:
    return self.scheduler.admission_paused

  @admission_paused.setter
  def admission_paused(self, paused: bool) -> None:
    self.scheduler.admission_paused = paused

  @property
  def has_work(self) -> bool:
    return self.scheduler.has_work

  @property
  def queue_length(self) -> int:
    return len(self.scheduler.waiting)

  @property
  def num_running(self) -> int:
    return len(self.scheduler.running)

  @property
  def kv_blocks_peak(self) -> int:
    """Most KV blocks ever in use at once (over every pool size)."""
    return self.scheduler.kv_blocks_peak

  @property
  def pager_state(self):
    """The paged source's `PagerState` after the last step (None for other
    sources); read it before the next step, which donates it."""
    return self.executor.pager_state

  def submit(self, request: Request) -> RequestResult:
    """Queues `request` (it arrives now); returns its live result.

    An invalid request is not queued: its result carries the error.

    Raises:
      ValueError: a request with this id was submitted before.
      QueueFullError: `max_queue` requests are waiting.
    """
    return self.scheduler.submit(request)

  def cancel(self, request_id) -> bool:
    """Stops a running or waiting request: its blocks are freed and it
    finishes with finish_reason "cancelled" and its tokens so far.

    Returns:
      True if it was live, False if it had already finished.

    Raises:
      KeyError: no request with this id was submitted (or it was popped).
    """
    return self.scheduler.cancel(request_id)

  def pop_finished(self) -> list[RequestResult]:
    """The finished results (in submission order), forgotten by the engine
    (`results` keeps only the live ones)."""
    return self.scheduler.pop_finished()

  def running_contexts(self) -> list[int]:
    """Tokens each running request holds (prompt + generated): what it
    re-prefills if preempted now."""
    return [seq.prompt.size + len(seq.generated)
            for seq in self.scheduler.running]

  def live_requests(self) -> list[Request]:
    """The running requests (in admission order), then the waiting ones."""
    s = self.scheduler
    return [seq.request for seq in s.running + list(s.waiting)]

  # -- the step ----------------------------------------------------------------

  def _fault(self, error: BaseException, kind: str,
             seq: scheduler_lib.LiveRequest | None = None) -> None:
    """Recovers from a step that raised (see the module docstring).

    `seq` is the request a prefill was for. An interrupt (not an
    `Exception`) is recovered from the same way but charged to no request,
    and the caller re-raises it.
    """
    s = self.scheduler
    charged = isinstance(error, Exception)
    if seq is not None:  # first, so the request is never lost
      s.prefill_failed(seq, _describe(error) if charged else None)
    pool_lost, _ = self.executor.recover()
    if pool_lost:  # every running request's keys and values are gone
      s.drain()
    if not charged:
      return
    self.num_faults += 1
    self._step_faults += 1
    if kind != "decode":
      return
    self._decode_faults += 1
    if self._decode_faults >= FAULTS_TO_FAIL:
      self._decode_faults = 0
      message = (f"the engine failed: {FAULTS_TO_FAIL} decode steps in a row "
                 f"raised (last: {_describe(error)}); every in-flight "
                 "request failed with this error; the device state was "
                 "rebuilt and the engine accepts new requests.")
      failed = s.fail_all(message)
      ids = [seq.request.request_id for seq in failed]
      self._failure = EngineFailedError(
          f"{message} Failed requests ({len(ids)}): {ids}.")
      self._failure.__cause__ = error

  def _admit(self) -> tuple[int, int]:
    """Admits and prefills waiting requests; returns (prefills, tokens)."""
    s = self.scheduler
    prefills = tokens = 0
    while (seq := s.admit_next()) is not None:
      context = seq.context
      t = scheduler_lib.bucket_for(context.size, self.prefill_buckets)
      try:
        token, finite = self.executor.run([seq.row(context, 0)], 1, t,
                                          "prefill")
      except BaseException as e:  # an interrupt is re-raised below
        self._fault(e, "prefill", seq)
        if not isinstance(e, Exception):
          raise
        continue
      self.executor.scrub(s.prefilled(seq, token[0], finite[0]))
      prefills, tokens = prefills + 1, tokens + int(context.size)
    return prefills, tokens

  def _decode(self) -> tuple[int, int]:
    """One decode step over the running requests; returns its batch size
    and the key positions its rows read (0, 0 if it raised)."""
    batch = self.scheduler.decode_batch()
    if not batch:
      return 0, 0
    bucket = scheduler_lib.bucket_for(len(batch), self.batch_buckets)
    rows = [seq.row([seq.generated[-1]], seq.kv_len) for seq in batch]
    try:
      tokens, finite = self.executor.run(rows, bucket, 1, "decode")
    except BaseException as e:  # an interrupt is re-raised below
      self._fault(e, "decode")
      if not isinstance(e, Exception):
        raise
      return 0, 0
    self._decode_faults = 0
    context = sum(seq.kv_len + 1 for seq in batch)
    self.executor.scrub(self.scheduler.decoded(batch, tokens, finite))
    return len(batch), context

  def step(self) -> StepMetrics:
    """Expires, admits, prefills and decodes once; returns the step's
    metrics.

    Raises:
      EngineFailedError: decode steps kept raising (see the module
        docstring); raised once, after the step's metrics are written.
    """
    s = self.scheduler
    started = self.clock()
    before = self.executor.counters.copy()
    preempted_before = s.num_preemptions
    self._step_faults = 0
    expired = len(s.expire())
    # The allocator's peak over this step alone, then its running peak.
    peak_before = s.allocator.peak_in_use
    s.allocator.peak_in_use = s.allocator.num_in_use
    try:
      prefills, prefill_tokens = self._admit()
      s.unblock()
      batch, context = self._decode()
    finally:  # an interrupt keeps the running peak too
      step_peak = s.allocator.peak_in_use
      s.allocator.peak_in_use = max(peak_before, step_peak)
    traffic = (self.executor.counters - before).sum(axis=1)
    record = StepMetrics(
        step=s.step_count, time_s=self.clock() - self._start_time,
        step_s=self.clock() - started, batch_size=batch,
        batch_bucket=(scheduler_lib.bucket_for(batch, self.batch_buckets)
                      if batch else 0),
        prefills=prefills, prefill_tokens=prefill_tokens,
        decode_context_tokens=context, queue_length=len(s.waiting),
        running=len(s.running), kv_blocks=s.allocator.num_blocks,
        slots_per_layer=tuple(self.split.slots_per_layer),
        kv_blocks_in_use=s.allocator.num_in_use,
        kv_blocks_step_peak=step_peak, kv_blocks_peak=self.kv_blocks_peak,
        preemptions=s.num_preemptions - preempted_before,
        preemptions_total=s.num_preemptions,
        pager_hits=int(traffic[0]), pager_misses=int(traffic[1]),
        pager_loads=int(traffic[2]),
        pager_bytes=int(traffic[2]) * self.bytes_per_expert,
        faults=self._step_faults, expired=expired)
    self.metrics.write(record)
    s.step_count += 1
    if self._failure is not None:
      failure, self._failure = self._failure, None
      raise failure
    return record

  def _submitted(self, request: Request) -> RequestResult | None:
    """The result of `request` if it was submitted already (by this
    unfinished run, or by id), else None."""
    entry = self._run_submitted.get(id(request))
    if entry is not None and entry[0] is request:
      return entry[1]
    if request.request_id is not None and id_error(request) is None:
      return self.results.get(request.request_id)
    return None

  def run(self, requests: Sequence[Request],
          on_step: Callable[[StepMetrics], None] | None = None
          ) -> list[RequestResult]:
    """Serves `requests` (each arriving at its `arrival_step` from now)
    until all finish; returns their results in order.

    Resumable: requests already submitted (by an earlier call that raised,
    or with an id the engine already holds) are not submitted again; their
    results are waited for and returned. With `max_queue`, arrivals wait
    outside the engine until the queue has room.

    Raises:
      RuntimeError: no step can make progress (admission paused with
        nothing running, and `on_step` did not resume it).
      EngineFailedError: from `step`.
    """
    first = self.step_count
    order = sorted(range(len(requests)),
                   key=lambda i: arrival_of(requests[i]))
    results: list[RequestResult | None] = [None] * len(requests)
    cursor = 0
    while cursor < len(order) or self.has_work:
      while (cursor < len(order) and arrival_of(requests[order[cursor]])
             <= self.step_count - first):
        request = requests[order[cursor]]
        result = self._submitted(request)
        if result is None:
          if self.scheduler.queue_full:
            break  # backpressure: it arrives once there is room
          result = self.submit(request)
          self._run_submitted[id(request)] = (request, result)
        results[order[cursor]] = result
        cursor += 1
      if not self.has_work:  # idle until the next arrival
        self.scheduler.step_count += 1
        continue
      record = self.step()
      if on_step is not None:
        on_step(record)
      s = self.scheduler
      if (not record.prefills and not record.batch_size and
          s.admission_paused and s.waiting and not s.running):
        raise RuntimeError(
            f"run() cannot make progress: admission is paused with "
            f"{len(s.waiting)} requests waiting and none running; set "
            "engine.admission_paused = False (on_step may), then call run() "
            "again to resume.")
    self._run_submitted = {}
    return results

  # -- resizing (at drained barriers, see serving.controller) -----------------

  def drain(self) -> int:
    """Preempts every running request by recompute (they return to the head
    of the queue in admission order, keeping their tokens); returns how
    many."""
    return self.scheduler.drain()

  def resize(self, split: Split) -> dict[str, Any]:
    """Applies `split` at a drained barrier (no request running).

    Pools that shrink do so first (slots via `paging.resize`: residents that
    still fit stay resident; the KV pool is rebuilt), then the others grow,
    so device usage stays within the budget throughout.

    Returns:
      `{"moved": slot rows moved, "evicted": residents evicted, "phases":
      the splits applied in order (shrink, then grow)}`.

    Raises:
      RuntimeError: requests are running (`drain` first).
      ValueError: slots outside [top_k, min(E, num_slots)] (or changed for
        a source other than `paged`), or fewer KV blocks than a queued
        request needs: a resize drops no request.
      BudgetError: a split that does not fit the budget.
    """
    s = self.scheduler
    if s.running:
      raise RuntimeError(f"{len(s.running)} requests are running; "
                         "resize only at a drained barrier (call drain()).")
    c, slots = self.config, np.asarray(split.slots_per_layer)
    most = min(c.num_experts, self.num_slots or 0)
    if self.experts != "paged" and split.slots_per_layer != (
        self.split.slots_per_layer):
      raise ValueError(f"the {self.experts!r} source keeps its slots "
                       f"{list(self.split.slots_per_layer)}.")
    if self.experts == "paged":
      check_capacity(slots, c.num_layers, c.top_k, most,
                     low_why=f"top_k={c.top_k}", low_label=f"top_k={c.top_k}",
                     high_why=f"{most} (num_slots={self.num_slots} buffer "
                     f"rows, E={c.num_experts})")
    need = s.largest_queued_need()
    if split.kv_blocks < need:
      raise ValueError(f"kv_blocks={split.kv_blocks} cannot hold a queued "
                       f"request that needs {need} blocks.")
    if self.budget is not None:
      self.budget.check(split)
    shrunk = Split(tuple(np.minimum(slots, self.split.slots_per_layer)
                         .tolist()),
                   min(split.kv_blocks, self.split.kv_blocks))
    moved = evicted = 0
    for target in (shrunk, split):
      if target.slots_per_layer != self.split.slots_per_layer:
        moves, evictions = self.executor.resize_slots(target.slots_per_layer)
        moved, evicted = moved + moves, evicted + evictions
      if target.kv_blocks != s.allocator.num_blocks:
        s.replace_pool(target.kv_blocks)
        self.executor.replace_pool(target.kv_blocks)
      self.split = target
    self.budget_usage = (None if self.budget is None else
                         self.budget.check(split))
    return {"moved": moved, "evicted": evicted, "phases": [shrunk, split]}

  # -- statistics ---------------------------------------------------------------

  def expert_stats(self) -> dict[str, Any]:
    """Cumulative pager traffic of the engine (all steps)."""
    counters = self.executor.counters
    hits, misses, loads = (int(x) for x in counters.sum(axis=1))
    total = hits + misses
    return {"source": self.experts, "hits": hits, "misses": misses,
            "loads": loads, "hit_rate": hits / total if total else 1.0,
            "bytes_moved": loads * self.bytes_per_expert,
            "bytes_per_expert": self.bytes_per_expert,
            "hits_per_layer": counters[0].tolist(),
            "misses_per_layer": counters[1].tolist()}

  def summary(self) -> dict[str, Any]:
    """Engine-level totals: steps, preemptions, KV peak, pager traffic."""
    return {"steps": self.step_count, "preemptions": self.num_preemptions,
            "faults": self.num_faults,
            "kv_blocks_reclaimed": self.scheduler.blocks_reclaimed,
            "kv_blocks": self.allocator.num_blocks,
            "kv_blocks_peak": self.kv_blocks_peak,
            "block_size": self.block_size, "max_batch": self.max_batch,
            "slots_per_layer": list(self.split.slots_per_layer),
            "batch_buckets": list(self.batch_buckets),
            "pager": self.expert_stats(), "budget": self.budget_usage}

  def close(self) -> None:
    self.metrics.close()
