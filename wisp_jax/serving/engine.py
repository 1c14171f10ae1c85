"""Continuous-batching serving engine over a paged KV pool and expert pager.

Each `step()` (1) admits waiting requests in arrival order while the batch
has room and the pool has the blocks of their context and first decode
token (beyond the blocks the running requests take in this step), prefilling
each one alone (padded to a length bucket) so it samples its next token, then
(2) runs one decode step over every running request, padded to a batch
bucket. A request that needs a new block when the pool is empty preempts
the most recently admitted request: its blocks are freed and it goes back
to the head of the queue, keeping its tokens; when readmitted it re-prefills
prompt + tokens so far and continues where it stopped, with the sampling key
of each token fixed by the request alone (see `batch_step`), so batching and
preemption leave its tokens those of `generate` on the request by itself
(the recomputed keys and values can differ from the incremental ones only by
float rounding). Finished requests free their blocks at once. One expert
source (pager state and slots) serves every step of the engine.

Results per request: tokens, TTFT, decode tokens/s, latency, error. A
request that cannot be served (too long, bad token ids) fails alone: the
error is recorded on it and the others run.

`resize(split)` re-divides device memory between expert slots and KV blocks
at a drained barrier (`drain()` preempts by recompute as above; the online
controller in `serving.controller` drives both). The slot buffer holds
`num_slots` rows per layer, so capacities change without recompiling; the
KV pool is rebuilt at its new size (steps compile once per pool size).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging.sources import SOURCES
from wisp_jax.serving import batch_step
from wisp_jax.serving import kv_pool
from wisp_jax.serving.budget import DeviceBudget, Split
from wisp_jax.serving.request import (Request, prompt_array,
                                      validate_request)
from wisp_jax.serving.stats import MetricsWriter, RequestResult


@dataclasses.dataclass(eq=False)
class _Live:
  """Engine-side state of an admitted or waiting request."""
  request: Request
  result: RequestResult
  prompt: np.ndarray
  generated: list[int] = dataclasses.field(default_factory=list)
  blocks: list[int] = dataclasses.field(default_factory=list)
  kv_len: int = 0  # positions of this request in the pool

  @property
  def context(self) -> np.ndarray:
    return np.concatenate([self.prompt, np.asarray(self.generated, np.int32)])

  def counter(self) -> int:
    """Sampling counter of the next token (as `generate` for one prompt)."""
    n = len(self.generated)
    return 0 if n == 0 else len(self.prompt) + n - 1


class Engine:
  """Serves requests with continuous batching; see the module docstring."""

  def __init__(self, model: MoEModel, budget: DeviceBudget | None,
               slots_per_layer=None, kv_blocks: int = 64,
               block_size: int = 16, max_batch: int = 8, *,
               experts: str = "paged", policy: str = "lru",
               policy_options: dict | None = None, hot_set=None,
               min_prefill_bucket: int = 16, num_slots: int | None = None,
               workdir: str | None = None,
               clock: Callable[[], float] = time.perf_counter):
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
      clock: time source in seconds.
    """
    config = model.config
    for name, value in (("kv_blocks", kv_blocks), ("block_size", block_size),
                        ("max_batch", max_batch)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    self.model, self.config = model, config
    self.block_size, self.max_batch = int(block_size), int(max_batch)
    self.experts = experts
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

    bank = (model.experts.weights() if experts == "resident" else
            bank_lib.make_bank(model.experts.weights()))
    self.spec, self._arrays, self._carry = paging_api.make_source(
        config, bank, experts, slots_per_layer, policy, policy_options,
        hot_set, num_slots if experts == "paged" else None)
    self.num_slots = (self.spec.num_slots(self._carry) if experts == "paged"
                      else None)
    self.bytes_per_expert = bank_lib.bytes_per_expert(bank)
    self._graphdef, self._state = nnx.split(model.decoder)
    self._pool = kv_pool.KVPool.create(config, kv_blocks, block_size,
                                       model.dtype)
    # Every step input is committed to one device: jit compiles separately
    # for committed and uncommitted arguments, and step outputs are
    # committed, so mixing them would compile each bucket twice. (The host
    # bank is already committed to its pinned_host memory.)
    self._device = jax.devices()[0]
    self._state, self._pool, self._carry = jax.device_put(
        (self._state, self._pool, self._carry), self._device)
    if experts == "resident":
      self._arrays = jax.device_put(self._arrays, self._device)
    self.allocator = kv_pool.BlockAllocator(kv_blocks)
    self.max_blocks = kv_pool.max_blocks_per_request(config, block_size)
    self.batch_buckets = batch_step.powers_of_two_upto(max_batch)
    self.prefill_buckets = batch_step.powers_of_two_upto(
        config.max_seq_len, min(min_prefill_bucket, config.max_seq_len))

    self.clock = clock
    self.metrics = MetricsWriter(workdir)
    self.step_count = 0
    self.num_preemptions = 0
    # While True, waiting requests are not admitted (a draining barrier).
    self.admission_paused = False
    self._kv_peak = 0  # peak blocks in use of pools replaced by resizes
    self.results: dict[Any, RequestResult] = {}
    self._waiting: collections.deque[_Live] = collections.deque()
    self._running: list[_Live] = []  # in admission order
    self._next_id = 0
    self._counters = np.zeros((3, config.num_layers), np.int64)
    self._start_time = clock()

  # -- requests --------------------------------------------------------------

  def submit(self, request: Request) -> RequestResult:
    """Queues `request` (it arrives now); returns its live result.

    An invalid request is not queued: its result carries the error.
    """
    if request.request_id is None:
      request = dataclasses.replace(request, request_id=self._next_id)
    self._next_id += 1
    if request.request_id in self.results:
      raise ValueError(f"duplicate request_id {request.request_id!r}.")
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
      self._finish_error(result, error)
      return result
    self._waiting.append(_Live(request, result, prompt.astype(np.int32)))
    return result

  def _finish_error(self, result: RequestResult, error: str) -> None:
    result.error, result.finish_reason = error, "error"
    result.finish_time, result.finish_step = self.clock(), self.step_count

  @property
  def has_work(self) -> bool:
    return bool(self._waiting or self._running)

  @property
  def queue_length(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  # -- the step ----------------------------------------------------------------

  def _call(self, step_fn, rows: Sequence[batch_step.Row], batch: int,
            t: int) -> np.ndarray:
    inputs = jax.device_put(
        batch_step.make_input(rows, batch, t, self.max_blocks), self._device)
    out = step_fn(self._graphdef, self._state, self.spec, self._arrays,
                  self._carry, inputs.view(self._pool), inputs.tokens,
                  inputs.sampling)
    self._pool, self._carry = out.kv.pool, out.carry
    token, counters = jax.device_get((out.token, out.counters))
    self._counters = np.asarray(counters, np.int64)
    return np.asarray(token)

  def _row(self, live: _Live, tokens, length: int) -> batch_step.Row:
    return batch_step.Row(tokens=tokens, blocks=live.blocks, length=length,
                          seed=live.request.seed, counter=live.counter(),
                          temperature=live.request.temperature)

  def _append(self, live: _Live, token: int) -> bool:
    """Records a sampled token; finishes the request if done. True if done."""
    live.generated.append(int(token))
    result, request = live.result, live.request
    if result.first_token_time is None:
      result.first_token_time = self.clock()
    stop = request.stop_token is not None and token == request.stop_token
    if not stop and len(live.generated) < request.max_new_tokens:
      return False
    result.tokens = list(live.generated)
    result.finish_reason = "stop" if stop else "length"
    result.finish_time, result.finish_step = self.clock(), self.step_count
    self.allocator.free(live.blocks)
    live.blocks = []
    return True

  def _admit(self) -> tuple[int, int]:
    """Admits and prefills waiting requests; returns (prefills, tokens)."""
    prefills = tokens = 0
    if self.admission_paused:
      return prefills, tokens
    # Blocks the running requests take in this step's decode: admission
    # leaves them free, so admitting never forces a preemption at once.
    reserved = sum(live.kv_len == len(live.blocks) * self.block_size
                   for live in self._running)
    while self._waiting and len(self._running) < self.max_batch:
      live = self._waiting[0]
      context = live.context
      # Room for the context and the first decode token (never past the
      # last position the request writes).
      last = live.prompt.size + live.request.max_new_tokens - 1
      need = kv_pool.blocks_for(min(context.size + 1, last), self.block_size)
      if not self.allocator.can_alloc(need + reserved):
        break
      self._waiting.popleft()
      live.blocks = self.allocator.alloc(need)
      t = batch_step.bucket_for(context.size, self.prefill_buckets)
      token = self._call(batch_step.prefill_step,
                         [self._row(live, context, 0)], 1, t)
      live.kv_len = int(context.size)
      prefills, tokens = prefills + 1, tokens + int(context.size)
      if not self._append(live, token[0]):
        self._running.append(live)
    return prefills, tokens

  def _preempt(self, victim: _Live) -> None:
    self._running.remove(victim)
    self.allocator.free(victim.blocks)
    victim.blocks, victim.kv_len = [], 0
    victim.result.preemptions += 1
    self.num_preemptions += 1
    self._waiting.appendleft(victim)

  def _reserve_decode_blocks(self) -> None:
    """Gives every running request room for one more position, preempting
    the most recently admitted requests while the pool is empty."""
    i = 0
    while i < len(self._running):
      live = self._running[i]
      if live.kv_len == len(live.blocks) * self.block_size:
        while not self.allocator.can_alloc(1):
          victim = self._running[-1]
          self._preempt(victim)
          if victim is live:  # it was the newest: nothing after it
            return
        live.blocks = live.blocks + self.allocator.alloc(1)
      i += 1

  def _decode(self) -> tuple[int, int]:
    """One decode step over the running requests; returns its batch size
    and the key positions its rows read."""
    self._reserve_decode_blocks()
    if not self._running:
      return 0, 0
    running = list(self._running)
    context = sum(live.kv_len + 1 for live in running)
    batch = batch_step.bucket_for(len(running), self.batch_buckets)
    rows = [self._row(live, [live.generated[-1]], live.kv_len)
            for live in running]
    tokens = self._call(batch_step.decode_step, rows, batch, 1)
    for live, token in zip(running, tokens):
      live.kv_len += 1
      if self._append(live, token):
        self._running.remove(live)
    return len(running), context

  def step(self) -> dict[str, Any]:
    """Admits, prefills and decodes once; returns the step's metrics."""
    started = self.clock()
    before = self._counters.copy()
    preempted_before = self.num_preemptions
    # The allocator's peak over this step alone, then its running peak.
    peak_before = self.allocator.peak_in_use
    self.allocator.peak_in_use = self.allocator.num_in_use
    prefills, prefill_tokens = self._admit()
    if (not self._running and self._waiting and not self.admission_paused
        and self.allocator.num_in_use == 0):
      # Cannot happen for validated requests; never spin forever.
      live = self._waiting.popleft()
      self._finish_error(live.result, "the request does not fit in the KV "
                         f"pool of {self.allocator.num_blocks} blocks.")
    batch, context = self._decode()
    step_peak = self.allocator.peak_in_use
    self.allocator.peak_in_use = max(peak_before, step_peak)
    traffic = (self._counters - before).sum(axis=1)
    record = {
        "step": self.step_count, "time_s": self.clock() - self._start_time,
        "step_s": self.clock() - started, "batch_size": batch,
        "batch_bucket": (batch_step.bucket_for(batch, self.batch_buckets)
                         if batch else 0),
        "prefills": prefills, "prefill_tokens": prefill_tokens,
        "decode_context_tokens": context,
        "queue_length": len(self._waiting), "running": len(self._running),
        "kv_blocks": self.allocator.num_blocks,
        "slots_per_layer": list(self.split.slots_per_layer),
        "kv_blocks_in_use": self.allocator.num_in_use,
        "kv_blocks_step_peak": step_peak,
        "kv_blocks_peak": self.kv_blocks_peak,
        "preemptions": self.num_preemptions - preempted_before,
        "preemptions_total": self.num_preemptions,
        "pager_hits": int(traffic[0]), "pager_misses": int(traffic[1]),
        "pager_loads": int(traffic[2]),
        "pager_bytes": int(traffic[2]) * self.bytes_per_expert,
    }
    self.metrics.write(record)
    self.step_count += 1
    return record

  def run(self, requests: Sequence[Request],
          on_step: Callable[[dict[str, Any]], None] | None = None
          ) -> list[RequestResult]:
    """Serves `requests` (each arriving at its `arrival_step` from now)
    until all finish; returns their results in order."""
    first = self.step_count
    order = sorted(range(len(requests)),
                   key=lambda i: requests[i].arrival_step)
    results: list[RequestResult | None] = [None] * len(requests)
    cursor = 0
    while cursor < len(order) or self.has_work:
      while (cursor < len(order) and
             requests[order[cursor]].arrival_step <= self.step_count - first):
        results[order[cursor]] = self.submit(requests[order[cursor]])
        cursor += 1
      if not self.has_work:  # idle until the next arrival
        self.step_count += 1
        continue
      record = self.step()
      if on_step is not None:
        on_step(record)
    return results

  # -- resizing (at drained barriers, see serving.controller) -----------------

  @property
  def pager_state(self):
    """The paged source's `PagerState` after the last step (None for other
    sources); read it before the next step, which donates it."""
    return (self.spec.pager_state(self._carry) if self.experts == "paged"
            else None)

  def live_requests(self) -> list[Request]:
    """The running requests (in admission order), then the waiting ones."""
    return [live.request for live in self._running + list(self._waiting)]

  def drain(self) -> int:
    """Preempts every running request by recompute (they return to the head
    of the queue in admission order, keeping their tokens); returns how
    many."""
    running = list(self._running)
    for live in reversed(running):
      self._preempt(live)
    return len(running)

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
    if self._running:
      raise RuntimeError(f"{len(self._running)} requests are running; "
                         "resize only at a drained barrier (call drain()).")
    c, slots = self.config, np.asarray(split.slots_per_layer)
    most = min(c.num_experts, self.num_slots or 0)
    if self.experts != "paged" and split.slots_per_layer != (
        self.split.slots_per_layer):
      raise ValueError(f"the {self.experts!r} source keeps its slots "
                       f"{list(self.split.slots_per_layer)}.")
    if self.experts == "paged" and not (
        slots.shape == (c.num_layers,) and c.top_k <= slots.min() and
        slots.max() <= most):
      raise ValueError(f"slots per layer must be {c.num_layers} values in "
                       f"[top_k={c.top_k}, {most}] (num_slots="
                       f"{self.num_slots} buffer rows), got {slots.tolist()}.")
    need = max([kv_pool.blocks_for(live.prompt.size + live.request.
                                   max_new_tokens - 1, self.block_size)
                for live in self._running + list(self._waiting)], default=1)
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
        self._carry, moves, evictions = self.spec.resize(
            self._carry, np.asarray(target.slots_per_layer))
        moved, evicted = moved + int(moves.sum()), evicted + int(
            evictions.sum())
      if target.kv_blocks != self.allocator.num_blocks:
        self._kv_peak = self.kv_blocks_peak
        self._pool = None  # free the old pool before the new one exists
        self._pool = jax.device_put(kv_pool.KVPool.create(
            c, target.kv_blocks, self.block_size, self.model.dtype),
                                    self._device)
        self.allocator = kv_pool.BlockAllocator(target.kv_blocks)
      self.split = target
    self.budget_usage = (None if self.budget is None else
                         self.budget.check(split))
    return {"moved": moved, "evicted": evicted, "phases": [shrunk, split]}

  # -- statistics ---------------------------------------------------------------

  @property
  def kv_blocks_peak(self) -> int:
    """Most KV blocks ever in use at once (over every pool size)."""
    return max(self._kv_peak, self.allocator.peak_in_use)

  def expert_stats(self) -> dict[str, Any]:
    """Cumulative pager traffic of the engine (all steps)."""
    hits, misses, loads = (int(x) for x in self._counters.sum(axis=1))
    total = hits + misses
    return {"source": self.experts, "hits": hits, "misses": misses,
            "loads": loads, "hit_rate": hits / total if total else 1.0,
            "bytes_moved": loads * self.bytes_per_expert,
            "bytes_per_expert": self.bytes_per_expert,
            "hits_per_layer": self._counters[0].tolist(),
            "misses_per_layer": self._counters[1].tolist()}

  def summary(self) -> dict[str, Any]:
    """Engine-level totals: steps, preemptions, KV peak, pager traffic."""
    return {"steps": self.step_count, "preemptions": self.num_preemptions,
            "kv_blocks": self.allocator.num_blocks,
            "kv_blocks_peak": self.kv_blocks_peak,
            "block_size": self.block_size, "max_batch": self.max_batch,
            "slots_per_layer": list(self.split.slots_per_layer),
            "batch_buckets": list(self.batch_buckets),
            "pager": self.expert_stats(), "budget": self.budget_usage}

  def close(self) -> None:
    self.metrics.close()
