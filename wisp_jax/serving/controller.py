"""The online controller of MV-WSA: resizes both pools while the engine serves.

Every `window` engine steps the controller hands what it observed (KV blocks
in use, queued requests, the experts each decode step needed, the lengths of
live requests) to a rule, which returns the next `Split` of device memory
between expert slots and KV blocks:

  step_curve  KV target = max(floor, peak blocks in use x (1 + headroom)),
              where the pool counts as full while requests wait for KV; the
              rest goes to (uniform) expert slots; a dead zone keeps the
              split while the target moves by <= dead_zone x the pool.
              (`alloc.online.step_curve_split`.)
  mv          re-estimates the routing curves from the routing observed
              online (`alloc.online.update_curves`), builds the workload of
              the live requests (their lengths, and as concurrency the
              requests that want to run: running + queued, up to the max
              batch) and re-solves MV-WSA; switches only if the predicted
              gain exceeds a dead zone (`alloc.online.mv_split`) and the
              seconds it would have saved over the windows that chose it
              pay for the drain's re-prefills (`price_moves`).

A change is applied at a barrier: `preempt` drains at once (running requests
are preempted by recompute, `Engine.drain`), `finish` stops admitting and
waits for the running requests to finish. Then `Engine.resize` shrinks
pools before growing others. The controller checks that every split the
engine passes through fits the budget:

  slots x expert bytes + KV blocks x block bytes + dense + workspace
      <= budget.

Budget accounting is logical: the slot buffer keeps `Engine.num_slots` rows
per layer (so capacities change without recompiling), while the KV pool is
rebuilt at its new size.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from wisp_jax.alloc import online
from wisp_jax.alloc import throughput as alloc_sim
from wisp_jax.alloc.curves import RoutingCurves
from wisp_jax.alloc.workload import Workload
from wisp_jax.models.config import MoEConfig
from wisp_jax.serving.budget import BudgetError, DeviceBudget, Split
from wisp_jax.sim import cost
from wisp_jax.sim import mrc

BARRIERS = ("preempt", "finish")


@dataclasses.dataclass(frozen=True)
class Observation:
  """What the controller sees of one engine step.

  Attributes:
    step: the engine step.
    kv_blocks: blocks in the pool during the step.
    kv_peak: most blocks in use at once during the step.
    batch: requests decoded in the step.
    waiting: requests queued at the end of the step.
    kv_waiting: of those, queued for lack of KV (the batch had room, or a
      request was preempted): `waiting` or 0.
    needed: `[L, E]` bool experts the step's decode needed (None: no
      decode, or a policy without `last_use`).
    lengths: `{request_id: (prompt length, max_new_tokens)}` of the live
      requests at the end of the step.
    contexts: tokens each running request holds at the end of the step
      (what a drain would re-prefill).
  """
  step: int
  kv_blocks: int
  kv_peak: int
  batch: int
  waiting: int
  kv_waiting: int
  needed: np.ndarray | None = None
  lengths: dict = dataclasses.field(default_factory=dict)
  contexts: tuple[int, ...] = ()


def _has_last_use(engine) -> bool:
  state = engine.pager_state
  return state is not None and hasattr(state.policy_state, "last_use")


def observe(engine, record: dict[str, Any], routing: bool = True
            ) -> Observation:
  """The observation of the step `record` an engine just ran (with the
  experts its decode needed if `routing`)."""
  needed = None
  state = engine.pager_state
  if routing and record.batch_size and _has_last_use(engine):
    # The step's decode ran last, at tick - 1.
    last_use, tick = jax.device_get((state.policy_state.last_use,
                                     state.tick))
    needed = np.asarray(last_use) == int(tick) - 1
  waiting = record.queue_length
  kv_limited = (record.batch_size < engine.max_batch or
                record.preemptions > 0)
  return Observation(
      step=record.step, kv_blocks=record.kv_blocks,
      kv_peak=record.kv_blocks_step_peak, batch=record.batch_size,
      waiting=waiting, kv_waiting=waiting if kv_limited else 0,
      needed=needed,
      lengths={r.request_id: (len(r.prompt), r.max_new_tokens)
               for r in engine.live_requests()},
      contexts=tuple(engine.running_contexts()))


def _sizes(budget: DeviceBudget):
  if budget is None or budget.footprint is None:
    raise BudgetError("the controller needs a DeviceBudget bound to the "
                      "model (budget.for_model(model, block_size)).")
  return budget.footprint


def max_slots_per_layer(budget: DeviceBudget, uniform: bool = True) -> int:
  """The most slots a layer can get next to the KV floor (top_k in the
  other layers unless `uniform`): the `num_slots` an engine needs."""
  f = _sizes(budget)
  left = budget.free_bytes - f.blocks_per_max_request * f.block_bytes
  if uniform:
    most = left // (f.num_layers * f.expert_bytes)
  else:
    most = f.top_k + (left - f.num_layers * f.top_k * f.expert_bytes) // (
        f.expert_bytes)
  if most < f.top_k:
    raise BudgetError(f"the budget's {budget.free_bytes} free bytes cannot "
                      f"hold the KV floor {f.blocks_per_max_request} blocks "
                      f"and top_k={f.top_k} slots in every layer.")
  return int(min(most, f.num_experts))


def fit(split: Split, budget: DeviceBudget, max_slots: int,
        kv_granule: int = 1) -> Split:
  """`split` made servable by the engine.

  Slots are capped at `max_slots` per layer; the KV pool is rounded down
  to `free blocks - k x kv_granule` blocks (the bytes not in KV come in
  whole granules, so few pool sizes occur and few steps compile), and
  raised to the floor (one max-length request); then the largest layers
  lose slots until the split fits the budget.
  """
  f = _sizes(budget)
  caps = np.minimum(np.asarray(split.slots_per_layer), max_slots)
  free_blocks = budget.free_bytes // f.block_bytes
  spare = max(free_blocks - split.kv_blocks, 0)
  kv = free_blocks - -(-spare // kv_granule) * kv_granule
  kv = max(kv, f.blocks_per_max_request)
  while sum(caps) * f.expert_bytes + kv * f.block_bytes > budget.free_bytes:
    layer = int(np.argmax(caps))
    if caps[layer] <= f.top_k:
      raise BudgetError(f"no split with {kv} KV blocks and top_k slots fits "
                        f"{budget.free_bytes} free bytes.")
    caps[layer] -= 1
  return Split.make(caps, kv, f.num_layers)


class StepCurveRule:
  """KV just above its peak use, the rest to uniform slots, a dead zone."""
  name = "step_curve"
  needs_routing = False

  def __init__(self, budget: DeviceBudget, headroom: float = 0.2,
               dead_zone: float = 0.1, kv_granule: int = 1,
               max_slots: int | None = None):
    self.budget, self.sizes = budget, _sizes(budget)
    self.headroom, self.dead_zone = headroom, dead_zone
    self.kv_granule = kv_granule
    self.max_slots = max_slots or max_slots_per_layer(budget)

  def decide(self, current: Split, window: Sequence[Observation]) -> Split:
    """The split after `window` (observed under `current`)."""
    f = self.sizes
    chosen = online.step_curve_split(
        self.budget.free_bytes, f.expert_bytes, f.block_bytes, f.num_layers,
        f.top_k, f.num_experts, f.blocks_per_max_request,
        current,
        max(o.kv_peak for o in window), window[-1].kv_waiting,
        self.headroom, self.dead_zone)
    chosen = fit(chosen,
                 self.budget, self.max_slots, self.kv_granule)
    # Slots unchanged and KV within the dead zone: not worth a barrier.
    if (chosen.slots_per_layer == current.slots_per_layer and
        abs(chosen.kv_blocks - current.kv_blocks) <= (
            self.dead_zone * current.kv_blocks)):
      return current
    return chosen


class MVRule:
  """Re-estimates routing curves online and re-solves MV-WSA."""
  name = "mv"
  needs_routing = True

  def __init__(self, budget: DeviceBudget, config: MoEConfig, hardware,
               max_batch: int, dead_zone: float = 0.05,
               curve_weight: float = 0.5, memory_windows: int = 2,
               kv_granule: int = 1, max_slots: int | None = None,
               uniform: bool = False, kv_model: str = "fluid",
               price_moves: bool = True):
    """Args:
      budget: the engine's budget, bound to its model.
      config: the model's config.
      hardware: a `sim.hardware` profile (name, dict or profile) whose
        costs (step overhead, host-to-device bandwidth) the simulator uses.
      max_batch: the engine's max batch (the most requests that run).
      dead_zone: least predicted relative gain that triggers a resize.
      curve_weight: weight of a new window's curves against the estimate.
      memory_windows: the workload's request lengths are those of the
        requests live in the last `memory_windows` windows.
      kv_granule: KV sizes step by this many blocks (see `fit`).
      max_slots: most slots per layer (default: what the budget allows).
      uniform: one cap for every layer (WiSP's) instead of MV-WSA's
        per-layer caps: fewer, larger moves when the curves are noisy.
      kv_model: the workload's KV model (`Workload.kv_model`): "fluid"
        (closed form: about 4 ms a decision with uniform caps on the
        `default` preset's workloads, 2-core CPU) or "simulate" (the
        scheduler replayed, as the offline configurator does: 20-300 ms
        there).
      price_moves: a move waits until the seconds it was predicted to
        save, summed over the tokens served since the consecutive
        decisions that chose it began, reach the predicted seconds of
        re-prefilling the requests its drain preempts
        (`online.window_saving`, `online.drain_seconds`); without it a
        move is made as soon as one window predicts it.
    """
    f = self.sizes = _sizes(budget)
    self.budget, self.config, self.hardware = budget, config, hardware
    self.max_batch, self.dead_zone = max_batch, dead_zone
    self.curve_weight, self.kv_granule = curve_weight, kv_granule
    self.uniform, self.kv_model = uniform, kv_model
    self.price_moves = price_moves
    self.max_slots = max_slots or max_slots_per_layer(budget, uniform)
    self.bytes_per_param = f.bytes_per_param
    self.kv_bytes_per_value = f.kv_bytes_per_value
    if (config.expert_bytes(self.bytes_per_param) != f.expert_bytes or
        f.block_size * cost.kv_bytes_per_token(
            config, self.kv_bytes_per_value) != f.block_bytes):
      raise ValueError(f"the budget's sizes (expert {f.expert_bytes}, block "
                       f"{f.block_bytes} bytes) are not {config.name}'s.")
    if memory_windows < 1:
      raise ValueError(f"memory_windows must be >= 1, got {memory_windows}.")
    self.recent: collections.deque = collections.deque(maxlen=memory_windows)
    self.curves: RoutingCurves | None = None
    self.last_gain: float | None = None
    # The move the last windows chose, the seconds they predicted it to
    # save, and the predicted seconds of its drain.
    self.candidate: Split | None = None
    self.saved_s = 0.0
    self.last_drain_s = 0.0
    self._last_step: int | None = None  # the previous window's last step

  def prepare(self, window: int) -> None:
    """Compiles the routing scan for every window of up to `window` decode
    steps (`Controller` calls it), so that no decision pays a compile."""
    f = self.sizes
    for steps in sorted({1 << max(s - 1, 0).bit_length()
                         for s in range(1, window + 1)}):
      mrc.mattson(np.zeros((steps, f.num_layers, f.num_experts), bool))

  def _update_curves(self, window: Sequence[Observation]) -> None:
    steps = [o for o in window if o.needed is not None and o.batch > 0]
    if not steps:
      return
    masks = np.stack([o.needed for o in steps])
    level = float(np.mean([o.batch for o in steps]))
    if self.curves is None:
      curve = mrc.mattson(masks)
      self.curves = RoutingCurves(
          concurrency=np.array([level]),
          misses_per_step=(curve.misses / curve.num_steps)[None],
          references_per_step=(curve.references / curve.num_steps)[None],
          top_k=self.config.top_k, source="observed online")
    else:
      self.curves = online.update_curves(self.curves, masks, level,
                                         self.curve_weight)

  def workload(self, window: Sequence[Observation]) -> Workload | None:
    """The workload the window shows (None before any routing is seen)."""
    self._update_curves(window)
    self.recent.append({k: v for o in window for k, v in o.lengths.items()})
    samples = {k: v for lengths in self.recent for k, v in lengths.items()}
    if self.curves is None or not samples:
      return None
    prompts, outputs = np.array(list(samples.values())).T
    wanting = max(o.batch + o.waiting for o in window)
    return Workload(model=self.config, hardware=self.hardware,
                    prompt_lens=prompts, output_lens=outputs,
                    concurrency=int(np.clip(wanting, 1, self.max_batch)),
                    curves=self.curves, bytes_per_param=self.bytes_per_param,
                    kv_bytes_per_value=self.kv_bytes_per_value,
                    block_size=self.sizes.block_size, name="online",
                    kv_model=self.kv_model)

  def _served(self, window: Sequence[Observation]) -> float:
    """Output tokens served since the previous decision: the window's, and
    at its mean batch those of the steps between the windows (a decision
    made beside the path leaves steps unobserved)."""
    tokens = float(sum(o.batch for o in window))
    if self._last_step is not None:
      gap = window[0].step - self._last_step - 1
      tokens += max(gap, 0) * tokens / len(window)
    return tokens

  def decide(self, current: Split, window: Sequence[Observation]) -> Split:
    """The split after `window` (observed under `current`)."""
    try:
      return self._decide(current, window)
    finally:
      if window:
        self._last_step = window[-1].step

  def _decide(self, current: Split, window: Sequence[Observation]) -> Split:
    workload = self.workload(window)
    if workload is None:
      return current
    # The same pageable bytes as the engine's budget.
    budget = alloc_sim.Budget(self.budget.free_bytes + workload.dense_bytes)
    chosen, self.last_gain = online.mv_split(workload, budget, current,
                                             self.dead_zone, self.uniform)
    target = current
    if chosen.slots_per_layer != current.slots_per_layer or (
        chosen.kv_blocks != current.kv_blocks):
      target = fit(chosen, self.budget, self.max_slots, self.kv_granule)
    if target == current or not self.price_moves:
      self.candidate, self.saved_s = None, 0.0
      return target
    if target != self.candidate:
      self.candidate, self.saved_s = target, 0.0
    at_target = alloc_sim.prediction(workload, target)
    self.saved_s += online.window_saving(
        self._served(window), alloc_sim.predict(workload, current),
        at_target.tokens_per_s)
    self.last_drain_s = online.drain_seconds(workload, at_target,
                                             window[-1].contexts)
    if self.saved_s < self.last_drain_s:
      return current
    self.candidate, self.saved_s = None, 0.0
    return target


class Controller:
  """Hooks a rule into an engine: `engine.run(requests, controller.on_step)`.

  Attributes:
    history: one dict per resize (step, splits, preempted requests, slot
      rows moved and evicted, used bytes of every split passed through,
      CPU seconds of the drain and the resize), after one for the initial
      split.
  """

  def __init__(self, engine, rule, window: int = 16,
               barrier: str = "preempt"):
    if window < 1:
      raise ValueError(f"window must be >= 1 step, got {window}.")
    if barrier not in BARRIERS:
      raise ValueError(f"barrier must be one of {BARRIERS}, got {barrier!r}.")
    if engine.budget is None:
      raise BudgetError("the controller needs an engine built with a "
                        "DeviceBudget.")
    if getattr(rule, "price_moves", False) and barrier != "preempt":
      raise ValueError(f"rule {getattr(rule, 'name', rule)!r} prices a move "
                       "by the re-prefills of a preempting drain; with "
                       f"barrier={barrier!r} build it with price_moves=False.")
    self.routing = getattr(rule, "needs_routing", True)
    if self.routing and not _has_last_use(engine):
      raise ValueError(f"rule {getattr(rule, 'name', rule)!r} observes "
                       "routing through the pager's last_use: use the paged "
                       f"source with policy lru, lfu or ws, not "
                       f"{engine.experts!r}/{engine.spec.policy!r}.")
    self.engine, self.rule = engine, rule
    self.window, self.barrier = window, barrier
    if hasattr(rule, "prepare"):
      rule.prepare(window)
    self._observed: list[Observation] = []
    self.decisions = 0  # calls of rule.decide
    self.pending: Split | None = None
    self.history: list[dict[str, Any]] = [self._entry(engine.split, {})]

  def _entry(self, split: Split, extra: dict) -> dict[str, Any]:
    return {"step": self.engine.step_count,
            "slots_per_layer": list(split.slots_per_layer),
            "kv_blocks": split.kv_blocks, **extra}

  def on_step(self, record: dict[str, Any]) -> None:
    """Observes a step; decides at the end of a window; resizes at the
    barrier."""
    if self.at_barrier():  # draining: observations are not typical
      return
    self._observed.append(observe(self.engine, record, self.routing))
    if len(self._observed) < self.window:
      return
    chosen = self.rule.decide(self.engine.split, self._observed)
    self.decisions += 1
    self._observed = []
    self.apply(chosen)

  def at_barrier(self) -> bool:
    """Whether a change waits for the running requests to finish (then
    applied once none runs)."""
    if self.pending is None:
      return False
    if not self.engine.num_running:
      self._resize(self.pending, 0)
    return True

  def apply(self, split: Split) -> None:
    """Moves to `split` at the barrier (nothing if it is the current one):
    `preempt` drains and resizes now, `finish` stops admitting until the
    running requests are done."""
    engine = self.engine
    if split == engine.split:
      return
    if self.barrier == "preempt" or not engine.num_running:
      started = time.perf_counter()
      preempted = engine.drain()
      self._resize(split, preempted, time.perf_counter() - started)
    else:
      self.pending = split
      engine.admission_paused = True

  def _resize(self, split: Split, preempted: int, drain_s: float = 0.0
              ) -> None:
    engine = self.engine
    started = time.perf_counter()
    old = engine.split
    done = engine.resize(split)
    budget = engine.budget
    used = [budget.usage(s)["used_bytes"] for s in [old] + done["phases"]]
    # The invariant, at every moment of the resize (shrink, then grow).
    if max(used) > budget.total_bytes:
      raise BudgetError(f"resize {old} -> {split} passed through {used} "
                        f"bytes; the budget is {budget.total_bytes}.")
    self.pending = None
    engine.admission_paused = False
    self._observed = []
    self.history.append(self._entry(split, {
        "from": {"slots_per_layer": list(old.slots_per_layer),
                 "kv_blocks": old.kv_blocks},
        "preempted": preempted, "slots_moved": done["moved"],
        "slots_evicted": done["evicted"], "used_bytes": used,
        "budget_bytes": budget.total_bytes,
        "seconds": drain_s + time.perf_counter() - started}))
