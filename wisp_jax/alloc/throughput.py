"""Predicted serving throughput of a split of device memory (the model).

Device memory = dense weights + workspace + expert slots + KV blocks. The
*pageable* bytes (budget - dense - workspace) are split between
`slots_per_layer[l]` experts per layer and `kv_blocks` KV blocks.

The engine serves a closed loop of C requests (the workload's
concurrency) with a max batch n <= C (the configurator picks n with the
split). Per engine step, in steady state:

  KV        `alloc.kv`: the scheduler's admission, block growth and
            preemption rules replayed on the workload's length samples
            give, for (n, b blocks), the mean batch m, decode passes d,
            prefill passes q (new and recomputed), preemptions, blocks in
            use, mean decode context and output tokens T per step.
            Closed form where n requests of the longest length fit; a
            grid of b in between, interpolated linearly (`KV_GRID`),
            replayed or, with `Workload.kv_model="fluid"`, in closed form
            (`alloc.kv.fluid`).
  experts   per layer l at capacity c_l, at batch m (curves at every
            integer level, interpolated in m):
              decode loads   D_l(c_l)                       per decode pass
              prefill loads  P_l(c_l)                       per new prefill
                             R_l(c_l)     per recompute (a preempted request)
              eviction       V_l(c_l): decode loads a prefill pass adds
            measured in the engine's own pass order (`alloc.steady`);
            curves without prefill data charge a prompt of p tokens
            u(p) (1 - c/E) loads per layer (uniform routing, no eviction),
            and R = P without per-request routing.
  time      base = d x step_cost(decode, m rows, mean context)
                   + sum over prefills of step_cost(prefill, its context)
            step = base + tau (d sum_l D_l + q_new sum_l P_l
                               + q_re sum_l R_l + q sum_l V_l)
            tau = expert bytes / host-to-device bandwidth (transfers are
            not overlapped, as in `sim.cost`).

Throughput = T / step output tokens per second; `J = step / T` is the time
per output token, the currency of the marginal values. The split's value
is the best n: `per_token_seconds` minimises J over n = 1..C.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Sequence

import numpy as np

from wisp_jax.alloc import kv as kv_model
from wisp_jax.alloc.curves import RoutingCurves, union_size
from wisp_jax.alloc.split import BudgetError, Split
from wisp_jax.alloc.steady import engine_curves
from wisp_jax.alloc.workload import Workload
from wisp_jax.paging.pager import check_capacity
from wisp_jax.sim import cost

KV_GRID = 12  # simulated pool sizes per max batch where the pool can bind
STATS = ("batch", "decodes", "new_prefills", "recompute_prefills",
         "prefill_tokens", "preemptions", "blocks_in_use", "context",
         "tokens", "base_seconds")


@dataclasses.dataclass(frozen=True)
class Budget:
  """Device bytes for one engine.

  Attributes:
    total_bytes: everything the engine may hold on the device.
    workspace_bytes: activations and scratch, never split.
  """
  total_bytes: int
  workspace_bytes: int = 0

  def pageable_bytes(self, workload: Workload) -> int:
    """Bytes left for expert slots and KV blocks."""
    return self.total_bytes - self.workspace_bytes - workload.dense_bytes

  def check(self, workload: Workload) -> int:
    """Refuses a budget that cannot hold the minimum; returns pageable.

    Raises:
      BudgetError: naming dense, workspace, KV floor and top_k slots bytes.
    """
    w = workload
    slots = w.model.num_layers * w.model.top_k
    floor = w.floor_blocks * w.block_bytes
    need = (w.dense_bytes + self.workspace_bytes + slots * w.expert_bytes
            + floor)
    if need > self.total_bytes:
      raise BudgetError(
          f"budget {self.total_bytes} bytes ({self.total_bytes / 2**30:.3f} "
          f"GiB) cannot serve {w.model.name}: dense weights "
          f"{w.dense_bytes} + workspace {self.workspace_bytes} + KV floor "
          f"{w.floor_blocks} blocks x {w.block_bytes} = {floor} ("
          f"{w.min_concurrency} request(s) of {w.max_len} tokens) + top_k "
          f"slots {w.model.num_layers} layers x {w.model.top_k} x "
          f"{w.expert_bytes} = {slots * w.expert_bytes} = {need} bytes ("
          f"{need / 2**30:.3f} GiB) > {self.total_bytes}. Raise the budget "
          f"by {need - self.total_bytes} bytes or shorten the longest "
          "request.")
    return self.pageable_bytes(w)

  def max_kv_blocks(self, workload: Workload, total_slots: int) -> int:
    """KV blocks that fit next to `total_slots` expert slots."""
    left = self.pageable_bytes(workload) - total_slots * workload.expert_bytes
    return max(left // workload.block_bytes, 0)

  def fill(self, workload: Workload, slots_per_layer: int | Sequence[int]
           ) -> Split:
    """The split with these slots and every block the rest affords."""
    split = Split.make(slots_per_layer, 0, workload.model.num_layers)
    return dataclasses.replace(split, kv_blocks=self.max_kv_blocks(
        workload, split.total_slots))

  def validate(self, workload: Workload, split: Split) -> None:
    """Raises BudgetError when `split` does not fit or cannot serve."""
    w = workload
    self.check_serves(w, split)
    used = split.total_slots * w.expert_bytes + split.kv_blocks * w.block_bytes
    if used > self.pageable_bytes(w):
      raise BudgetError(
          f"split needs {used} bytes (slots {split.total_slots} x "
          f"{w.expert_bytes} + KV {split.kv_blocks} x {w.block_bytes}) but "
          f"only {self.pageable_bytes(w)} are pageable (total "
          f"{self.total_bytes} - dense {w.dense_bytes} - workspace "
          f"{self.workspace_bytes}).")

  @staticmethod
  def check_serves(workload: Workload, split: Split) -> None:
    """Raises BudgetError when `split` has the wrong layers, slots outside
    [top_k, E] or a pool below the KV floor (bytes are not checked)."""
    w, m = workload, workload.model
    slots = np.asarray(split.slots_per_layer)
    if slots.shape != (m.num_layers,):
      raise BudgetError(f"split has slots for {slots.size} layers; "
                        f"{m.name} has {m.num_layers}.")
    check_capacity(slots, m.num_layers, m.top_k, m.num_experts,
                   low_why=f"top_k={m.top_k}", low_label=f"top_k={m.top_k}",
                   high_label=f"E={m.num_experts}",
                   high_why=f"its {m.num_experts} experts", error=BudgetError)
    if split.kv_blocks < w.floor_blocks:
      raise BudgetError(f"kv_blocks={split.kv_blocks} is below the floor "
                        f"{w.floor_blocks} ({w.min_concurrency} x "
                        f"{w.max_len} tokens at block_size {w.block_size}).")


@dataclasses.dataclass(frozen=True)
class KVTable:
  """The KV model of one max batch n.

  Attributes:
    grid: `[G]` pool sizes, increasing, the last = `top` (n x the longest
      request: from there on the pool never binds).
    stats: `[G, len(STATS)]` the rates of `STATS` at each grid point.
  """
  grid: np.ndarray
  stats: np.ndarray


@dataclasses.dataclass(frozen=True)
class Tables:
  """Per-workload constants of the model (see the module docstring).

  Attributes:
    tau: seconds to page in one expert.
    curves: `{name: [C, L, E + 1]}` per level n = 1..C: `decode_loads`,
      `decode_misses`, `prefill_loads`, `prefill_misses`,
      `recompute_loads`, `recompute_misses`, `eviction_loads`,
      `eviction_misses`; and `[C, L]` `decode_refs`,
      `prefill_refs`.
    measured_prefill: whether prefill passes were measured (else uniform
      routing fills them in).
    kv: `[C]` KVTable per max batch n = 1..C.
    longest: blocks of the longest request (the engine's positions).
  """
  tau: float
  curves: dict
  measured_prefill: bool
  kv: list
  longest: int


_TABLES: "weakref.WeakKeyDictionary[Workload, Tables]" = (
    weakref.WeakKeyDictionary())


def _level_curves(w: Workload) -> tuple[dict, bool]:
  """Every curve at levels 1..C (measured in engine order if possible)."""
  m = w.model
  levels = np.arange(1, w.concurrency + 1)
  curves, measured = w.curves, None
  if curves.routing is not None:
    measured = engine_curves(curves.routing, w.prompt_lens, w.output_lens,
                             levels, seed=0)
    curves = RoutingCurves.from_engine(measured, m.top_k,
                                       f"{curves.source}; engine order")
  at = curves.at_all(levels.astype(np.float64))
  out = {"decode_misses": at["misses"], "decode_loads": at["loads"],
         "decode_refs": at["references"]}
  if curves.has_prefill:
    for name in ("prefill_misses", "prefill_loads", "eviction_misses",
                 "eviction_loads"):
      out[name] = at[name]
    out["prefill_refs"] = at["prefill_references"]
    # Measured at levels 1..C exactly; without routing a recompute is
    # priced as a new prefill.
    out["recompute_misses"], out["recompute_loads"] = (
        (measured.recompute_misses, measured.recompute_loads)
        if measured is not None else
        (out["prefill_misses"].copy(), out["prefill_loads"].copy()))
    return out, True
  # A prompt routes uniformly; a slot holds it with probability c / E.
  union = float(np.mean(union_size(m.num_experts, m.top_k, w.prompt_lens)))
  caps = np.arange(m.num_experts + 1)
  shape = (levels.size, m.num_layers, m.num_experts + 1)
  prefill = np.broadcast_to(union * (1 - caps / m.num_experts), shape)
  out["prefill_misses"] = out["prefill_loads"] = prefill.copy()
  out["recompute_misses"] = out["recompute_loads"] = prefill.copy()
  out["eviction_misses"] = out["eviction_loads"] = np.zeros(shape)
  out["prefill_refs"] = np.full(shape[:2], union)
  return out, False


def _step_cost(w: Workload, batch: int, context: float, phase: str,
               needed: float) -> float:
  return _pass_cost(w.model, w.hardware, w.bytes_per_param, w.kv_width,
                    batch, context, phase, needed)


def _pass_cost(model, hardware, bytes_per_param: int, kv_width: int,
               batch: int, context: float, phase: str, needed: float
               ) -> float:
  return _cached_step_cost(
      model, hardware, int(batch), max(int(round(context)), 1), phase,
      int(min(round(needed), model.num_layers * model.num_experts)),
      bytes_per_param, kv_width)


@functools.lru_cache(maxsize=1 << 16)
def _cached_step_cost(model, hardware, batch: int, context: int, phase: str,
                      needed: int, bytes_per_param: int, kv_width: int
                      ) -> float:
  """`sim.cost.step_cost` without transfers (memoised: workloads built
  online ask for the same passes again)."""
  return cost.step_cost(
      model, hardware, batch=batch, context_len=context, mode="paged",
      phase=phase, misses=0, needed_experts=needed,
      bytes_per_param=bytes_per_param, kv_bytes_per_value=kv_width).total_s


def prefill_costs(w: Workload) -> np.ndarray:
  """`[max_len + 1]` seconds of one prefill pass by context length (do
  not modify the array: it is shared by workloads of the same model,
  hardware, widths and longest request)."""
  return _prefill_costs(w.model, w.hardware, w.bytes_per_param, w.kv_width,
                        int((w.prompt_lens + w.output_lens).max()))


@functools.lru_cache(maxsize=256)
def _prefill_costs(model, hardware, bytes_per_param: int, kv_width: int,
                   longest: int) -> np.ndarray:
  m = model
  lengths = np.arange(longest + 1)
  unions = m.num_layers * union_size(m.num_experts, m.top_k, lengths)
  out = np.array([_pass_cost(m, hardware, bytes_per_param, kv_width, 1,
                             max(n, 1), "prefill", u)
                  for n, u in zip(lengths, unions)])
  out.setflags(write=False)
  return out


def _decode_base(w: Workload, curves: dict, batch: np.ndarray,
                 context: np.ndarray) -> np.ndarray:
  """Decode seconds without transfers at a (fractional) mean batch."""
  refs = curves["decode_refs"].sum(axis=1)  # [C]
  b = np.atleast_1d(np.asarray(batch, np.float64))
  lo = np.clip(np.floor(b), 1, refs.size).astype(np.int64)
  hi = np.minimum(lo + 1, refs.size)
  frac = np.where(hi > lo, np.clip(b - lo, 0.0, 1.0), 0.0)
  return np.array([
      (1 - f) * _step_cost(w, low, ctx, "decode", refs[low - 1])
      + f * _step_cost(w, high, ctx, "decode", refs[high - 1])
      for low, high, f, ctx in zip(lo.tolist(), hi.tolist(), frac.tolist(),
                                   np.atleast_1d(context).tolist())])


def _stat_matrix(w: Workload, curves: dict, stats: kv_model.KVStats
                 ) -> np.ndarray:
  base = stats.decodes * _decode_base(w, curves, stats.batch, stats.context)
  columns = {name: getattr(stats, name) for name in STATS[:-1]}
  columns["base_seconds"] = base + stats.prefill_seconds
  return np.stack([columns[name] for name in STATS], axis=1)


def tables(workload: Workload) -> Tables:
  """The model's constants for `workload` (computed once, cached)."""
  if workload in _TABLES:
    return _TABLES[workload]
  w = workload
  curves, measured = _level_curves(w)
  bs, c = w.block_size, w.concurrency
  longest = int(kv_model.blocks_needed(w.prompt_lens, w.output_lens,
                                       bs).max())
  pcost = prefill_costs(w)
  ns = np.arange(1, c + 1)
  free = _stat_matrix(w, curves, kv_model.unconstrained(
      w.prompt_lens, w.output_lens, bs, ns, pcost))
  grids, sim_n, sim_b = [], [], []
  for n in ns:
    top = max(int(n * longest), w.floor_blocks)
    grid = np.unique(np.linspace(w.floor_blocks, top, KV_GRID + 1).round()
                     .astype(np.int64))
    grid = grid[(grid >= w.floor_blocks) & (grid < top)]
    grids.append(np.r_[grid, top])
    sim_n += [n] * grid.size
    sim_b += grid.tolist()
  sim = None
  if sim_n and w.kv_model == "fluid":
    sim = _stat_matrix(w, curves, kv_model.fluid(
        w.prompt_lens, w.output_lens, bs, sim_n, sim_b, prefill_cost=pcost))
  elif sim_n:
    sim = _stat_matrix(w, curves, kv_model.simulate(
        w.prompt_lens, w.output_lens, bs, c, sim_n, sim_b, seed=0,
        prefill_cost=pcost))
  kv, row = [], 0
  for i, grid in enumerate(grids):
    count = grid.size - 1
    rows = sim[row:row + count] if count else np.zeros((0, len(STATS)))
    row += count
    kv.append(KVTable(grid=grid.astype(np.float64),
                      stats=np.vstack([rows, free[i]])))
  out = Tables(tau=w.expert_bytes / w.hardware.h2d_bytes_per_s,
               curves=curves, measured_prefill=measured, kv=kv,
               longest=longest)
  _TABLES[workload] = out
  return out


def operating_point(workload: Workload, n: int, kv_blocks
                    ) -> dict[str, np.ndarray]:
  """The KV model's rates at max batch n for pool sizes `kv_blocks`
  (scalar or array); NaN below the floor."""
  t = tables(workload)
  table = t.kv[int(n) - 1]
  b = np.asarray(kv_blocks, np.float64)
  flat = np.atleast_1d(b)
  out = np.empty((flat.size, len(STATS)))
  for j in range(len(STATS)):
    out[:, j] = np.interp(flat, table.grid, table.stats[:, j])
  out[flat < workload.floor_blocks] = np.nan
  result = {name: out[:, j] for j, name in enumerate(STATS)}
  if b.ndim == 0:
    result = {k: v[0] for k, v in result.items()}
  return result


def level_weights(workload: Workload, batch) -> tuple[np.ndarray, ...]:
  """Integer levels (0-based) and weights that interpolate curves at a
  mean batch: value = (1 - f) X[lo] + f X[hi]."""
  c = workload.concurrency
  b = np.clip(np.asarray(batch, np.float64), 1.0, c)
  lo = np.floor(b).astype(np.int64)
  hi = np.minimum(lo + 1, c)
  frac = np.where(hi > lo, b - lo, 0.0)
  return lo - 1, hi - 1, frac


_LAYERS: "weakref.WeakKeyDictionary[Workload, dict]" = (
    weakref.WeakKeyDictionary())


def layer_seconds(workload: Workload, n: int, kv_blocks: float
                  ) -> tuple[np.ndarray, float, float]:
  """Per-layer transfer seconds per output token at (n, b), by capacity.

  Returns:
    `[L, E + 1]` seconds per token of layer l at capacity c, the base
    (non-transfer) seconds per token, and tokens per step (cached; do not
    modify the array).
  """
  cache = _LAYERS.setdefault(workload, {})
  key = (int(n), float(kv_blocks))
  if key not in cache:
    cache[key] = _layer_seconds(workload, n, kv_blocks)
  return cache[key]


def _layer_seconds(workload: Workload, n: int, kv_blocks: float
                   ) -> tuple[np.ndarray, float, float]:
  t = tables(workload)
  op = operating_point(workload, n, kv_blocks)
  lo, hi, frac = level_weights(workload, op["batch"])
  prefills = op["new_prefills"] + op["recompute_prefills"]
  cv = t.curves

  def at(name):
    return (1 - frac) * cv[name][lo] + frac * cv[name][hi]

  loads = (op["decodes"] * at("decode_loads") +
           op["new_prefills"] * at("prefill_loads") +
           op["recompute_prefills"] * at("recompute_loads") +
           prefills * at("eviction_loads"))
  return (t.tau * loads / op["tokens"],
          float(op["base_seconds"] / op["tokens"]), float(op["tokens"]))


def per_token_seconds(workload: Workload, slots_per_layer: Sequence[int],
                      kv_blocks: float, max_batch: int | None = None
                      ) -> tuple[float, int]:
  """min over n <= max_batch (default C) of J, and the best n."""
  caps = np.asarray(slots_per_layer, np.int64)
  rows = np.arange(caps.size)
  best = (np.inf, 1)
  for n in range(1, (max_batch or workload.concurrency) + 1):
    if kv_blocks < workload.floor_blocks:
      break
    per_layer, base, _ = layer_seconds(workload, n, kv_blocks)
    value = float(base + per_layer[rows, caps].sum())
    if value < best[0]:
      best = (value, n)
  return best


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The model's view of one split at its best max batch.

  Attributes:
    tokens_per_s: output tokens per second.
    concurrency: the max batch n the engine is configured with.
    batch: mean rows of a decode pass.
    seconds_per_token: J.
    step_seconds: seconds per engine step.
    decode_step_s: one decode pass, transfers included.
    decode_misses_per_step: expert misses per decode pass (prefill
      eviction included).
    decode_loads_per_step: expert copies per decode pass.
    prefill_loads_per_prefill: expert copies per prefill pass.
    prefills_per_step: prefill passes per step (new and recomputed).
    preemptions_per_step: requests preempted per step.
    kv_blocks_in_use: blocks held at the end of a step.
    decode_context: mean key positions per decode row.
    tokens_per_step: output tokens per step.
    kv_limited_concurrency: the most requests the pool holds at their
      mean size (<= C).
  """
  tokens_per_s: float
  concurrency: int
  batch: float
  seconds_per_token: float
  step_seconds: float
  decode_step_s: float
  decode_misses_per_step: float
  decode_loads_per_step: float
  prefill_loads_per_prefill: float
  prefills_per_step: float
  preemptions_per_step: float
  kv_blocks_in_use: float
  decode_context: float
  tokens_per_step: float
  kv_limited_concurrency: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def prediction(workload: Workload, split: Split,
               max_batch: int | None = None, fixed: bool = False
               ) -> Prediction:
  """Detailed prediction for `split` (no budget check; see Budget).

  Args:
    workload: the workload.
    split: the split.
    max_batch: the engine's max batch (default: the best n <= C).
    fixed: use `max_batch` itself instead of the best n below it.
  """
  w, t = workload, tables(workload)
  if split.kv_blocks < w.floor_blocks:
    raise BudgetError(f"kv_blocks={split.kv_blocks} is below the floor "
                      f"{w.floor_blocks} blocks.")
  caps = np.asarray(split.slots_per_layer, np.int64)
  rows = np.arange(caps.size)
  if fixed and max_batch:
    n = int(max_batch)
  else:
    _, n = per_token_seconds(w, caps, split.kv_blocks, max_batch)
  op = operating_point(w, n, split.kv_blocks)
  lo, hi, frac = level_weights(w, op["batch"])
  cv = t.curves

  def total(name):
    return float(((1 - frac) * cv[name][lo] + frac * cv[name][hi])[
        rows, caps].sum())

  prefills = float(op["new_prefills"] + op["recompute_prefills"])
  per_decode = prefills / max(float(op["decodes"]), 1e-12)
  decode_loads = total("decode_loads") + per_decode * total("eviction_loads")
  decode_misses = total("decode_misses") + per_decode * total(
      "eviction_misses")
  new, again = float(op["new_prefills"]), float(op["recompute_prefills"])
  prefill_loads = ((new * total("prefill_loads") +
                    again * total("recompute_loads")) / prefills
                   if prefills else total("prefill_loads"))
  step = float(op["base_seconds"]) + t.tau * (
      float(op["decodes"]) * decode_loads + prefills * prefill_loads)
  base_decode = float(_decode_base(w, cv, np.array([op["batch"]]),
                                   np.array([op["context"]]))[0])
  tokens = float(op["tokens"])
  return Prediction(
      tokens_per_s=tokens / step, concurrency=n, batch=float(op["batch"]),
      seconds_per_token=step / tokens, step_seconds=step,
      decode_step_s=base_decode + t.tau * decode_loads,
      decode_misses_per_step=decode_misses,
      decode_loads_per_step=decode_loads,
      prefill_loads_per_prefill=prefill_loads, prefills_per_step=prefills,
      preemptions_per_step=float(op["preemptions"]),
      kv_blocks_in_use=float(op["blocks_in_use"]),
      decode_context=float(op["context"]), tokens_per_step=tokens,
      kv_limited_concurrency=int(min(w.concurrency,
                                     split.kv_blocks // w.held_blocks)))


def predict(workload: Workload, split: Split) -> float:
  """Predicted output tokens per second of `split` on `workload`."""
  return prediction(workload, split).tokens_per_s
