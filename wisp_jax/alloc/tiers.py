"""Three-way MV-WSA: raw expert slots, a compressed device tier and KV.

A layer's device bytes hold c raw slots (the policy's cache, LRU here) and
a tier of z experts kept coded in device memory
(`paging.bank.make_tiered_bank`). The tier is a static plan: the z experts
that the layer's LRU cache of c slots misses most (`sim.mrc.expert_misses`
on a profile). A copy of a tier expert is decoded from device memory into
its raw slot; any other copy crosses PCIe from the host bank. The tier does
not change what the raw cache holds, only where a copy comes from, so a
layer's loads at capacity c are the two-way model's (`alloc.throughput`)
and the tier takes a share of them:

  share[n, l, c, z]  of layer l's LRU misses at capacity c, in the engine's
                     pass order at batch level n (`steady.level_stream`, the
                     stream the two-way curves are measured on), the
                     fraction that falls on its z most-missed experts
                     (`steady.lru_pass_counts(per_expert=True)`); the
                     pager's overflow reloads are taken to fall on the tier
                     in the same proportion.
  seconds_l(c, z)  = seconds_l(c) x ((1 - share) x host + share x decode)
      seconds_l(c)   the two-way transfer seconds per output token
                     (`throughput.layer_seconds`), at the split's batch
      host         = 1 for a raw host bank; 1 / r + decode for a coded one
                     (the copy crosses at 1 / r of its bytes, then decodes)
      decode       = h2d rate / decode rate (decoding one expert's raw
                     bytes on the device, against copying them over PCIe)
  bytes_l(c, z)    = c x expert bytes + z x ceil(expert bytes / r)

With z = 0 in every layer it is the two-way model. The share is read at
the split's own capacity, so the plan is the one `expert_misses` gives for
those slots; between batch levels it is interpolated like the curves.

`equimarginal` splits the budget by MV-WSA's rule with byte-weighted units
(a raw slot and a tier expert differ in size). Per max batch n:

  * each layer's options (c, z) form a Pareto front of seconds against
    bytes, and its lower convex hull: buying the hull's segments steepest
    first across layers equalises the layers' marginal seconds saved per
    byte (the Lagrangian split of the bytes);
  * the KV pool's marginal value changes only at the KV model's grid points
    (`alloc.marginal`: J is a ratio of linear functions between them), so
    the pool is sized at each grid point and at every block the budget
    affords, the rest of the bytes going to the layers as above; the pool
    size whose split has the least J is kept;
  * hull segments are exact only at their ends, so the split is then
    traded along the fronts (every option, as `solver.polish` moves along
    raw curves): d = 1..4 options bought by the layer that gains most per
    byte or sold by the one that loses least, against KV blocks or each
    other, while J falls.

The split runs at its best max batch; the n whose split is fastest wins.
`allow_tier=False` runs the same steps without a tier, the two-way
baseline on the same host bank.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import weakref
from typing import Any, Sequence

import numpy as np

from wisp_jax.alloc import steady
from wisp_jax.alloc import throughput
from wisp_jax.alloc.split import BudgetError, Split
from wisp_jax.alloc.workload import Workload

_MAX_TRADES = 256
_TRADE_WIDTH = 4  # options a trade moves along a layer's front
_CACHED_TABLES = 512  # option tables kept per workload


@dataclasses.dataclass(frozen=True)
class TierSpec:
  """The codec and the device's decoder, as the model sees them.

  Attributes:
    ratio: raw / coded bytes of one expert (> 1; `wisp_jax.compress`
      measures about 1.43 on bf16 weights).
    decode_bytes_per_s: the device's decode rate, in raw bytes of output
      per second.
    compressed_host: the host bank is coded too (`compressed_host=True` of
      `make_tiered_bank`): host copies cross at 1 / ratio of their bytes
      and are decoded on arrival.
  """
  ratio: float
  decode_bytes_per_s: float
  compressed_host: bool = False

  def __post_init__(self):
    if not self.ratio > 1:
      raise ValueError(f"ratio must be > 1 (raw / coded bytes), got "
                       f"{self.ratio}.")
    if not self.decode_bytes_per_s > 0:
      raise ValueError(f"decode_bytes_per_s must be > 0, got "
                       f"{self.decode_bytes_per_s}.")

  def coded_bytes(self, workload: Workload) -> int:
    """Device bytes of one tier expert."""
    return int(math.ceil(workload.expert_bytes / self.ratio))

  def factors(self, workload: Workload) -> tuple[float, float]:
    """(host, decode): a host copy's and a tier copy's seconds, in units
    of one raw copy over PCIe."""
    decode = workload.hardware.h2d_bytes_per_s / self.decode_bytes_per_s
    host = 1.0 / self.ratio + decode if self.compressed_host else 1.0
    return host, decode


@dataclasses.dataclass(frozen=True)
class TieredAllocation:
  """A three-way split and what the model predicts for it.

  Attributes:
    split: raw slots per layer and KV blocks.
    tier_per_layer: coded tier experts of each layer.
    tokens_per_s: predicted output tokens per second.
    max_batch: the engine's max batch n at that rate.
    bytes: raw slot, tier and KV bytes, and the pageable bytes.
    details: counts of what the solver did.
  """
  split: Split
  tier_per_layer: tuple[int, ...]
  tokens_per_s: float
  max_batch: int
  bytes: dict[str, int]
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    return {"tokens_per_s": self.tokens_per_s, **self.split.to_dict(),
            "tier_per_layer": list(self.tier_per_layer),
            "total_tier": int(sum(self.tier_per_layer)),
            "max_batch": self.max_batch, "bytes": dict(self.bytes),
            "details": dict(self.details)}


_SHARES: "weakref.WeakKeyDictionary[Workload, np.ndarray]" = (
    weakref.WeakKeyDictionary())


def tier_shares(workload: Workload) -> np.ndarray:
  """`[C, L, E + 1, E + 1]` share of misses at (level n, layer, capacity
  c) that the z most-missed experts take (see the module docstring).

  Raises:
    ValueError: when the workload's curves carry no per-request routing.
  """
  if workload in _SHARES:
    return _SHARES[workload]
  w = workload
  routing = w.curves.routing
  if routing is None:
    raise ValueError(
        f"the tier's share needs each expert's misses, and {w.name}'s curves "
        f"({w.curves.source or 'hand-made'}) carry no per-request routing; "
        "build them with alloc.curves.curves_from_trace on a trace with "
        "request ids.")
  levels = []
  for n in range(1, w.concurrency + 1):
    masks, _, measured = steady.level_stream(routing, w.prompt_lens,
                                             w.output_lens, n)
    counts = steady.lru_pass_counts(masks, np.zeros(len(masks), np.int64),
                                    measured, num_kinds=1,
                                    per_expert=True)[0]
    # [L, E, E + 1] -> [L, E + 1 (c), E] most-missed first at each c.
    by_expert = np.sort(np.moveaxis(counts.expert_misses, 1, 2),
                        axis=2)[..., ::-1]
    top = np.concatenate([np.zeros(by_expert.shape[:2] + (1,)),
                          np.cumsum(by_expert, axis=2)], axis=2)
    total = top[..., -1:]
    levels.append(np.divide(top, total, out=np.zeros_like(top),
                            where=total > 0))
  out = np.clip(np.stack(levels), 0.0, 1.0)
  _SHARES[w] = out
  return out


_OPTIONS: "weakref.WeakKeyDictionary[Workload, dict]" = (
    weakref.WeakKeyDictionary())


def option_seconds(workload: Workload, spec: TierSpec, n: int,
                   kv_blocks: float) -> tuple[np.ndarray, float]:
  """`[L, E + 1, E + 1]` transfer seconds per token of layer l with c raw
  slots and a tier of z, and the base seconds per token, at max batch n
  and a pool of `kv_blocks` (cached; do not modify the array)."""
  cache = _OPTIONS.setdefault(workload, {})
  key = (spec, int(n), float(kv_blocks))
  if key not in cache:
    if len(cache) >= _CACHED_TABLES:
      cache.clear()
    per_layer, base, _ = throughput.layer_seconds(workload, n, kv_blocks)
    op = throughput.operating_point(workload, n, kv_blocks)
    lo, hi, frac = throughput.level_weights(workload, op["batch"])
    shares = tier_shares(workload)
    share = (1 - frac) * shares[lo] + frac * shares[hi]
    host, decode = spec.factors(workload)
    cache[key] = (per_layer[:, :, None] * (host - (host - decode) * share),
                  float(base))
  return cache[key]


def split_bytes(workload: Workload, spec: TierSpec,
                slots_per_layer: Sequence[int], tier_per_layer: Sequence[int],
                kv_blocks: int) -> dict[str, int]:
  """Device bytes of each pool of a three-way split."""
  w = workload
  return {"raw_slots": int(np.sum(slots_per_layer)) * w.expert_bytes,
          "tier": int(np.sum(tier_per_layer)) * spec.coded_bytes(w),
          "kv": int(kv_blocks) * w.block_bytes}


def validate(workload: Workload, budget: throughput.Budget, spec: TierSpec,
             split: Split, tier_per_layer: Sequence[int]) -> None:
  """Raises BudgetError when a three-way split does not fit or cannot
  serve: tier sizes, the two-way checks but bytes, and the bytes of all
  three pools."""
  w, m = workload, workload.model
  tiers = np.asarray(tier_per_layer)
  if tiers.shape != (m.num_layers,):
    raise BudgetError(f"tier has sizes for {tiers.size} layers; {m.name} "
                      f"has {m.num_layers}.")
  if tiers.min() < 0 or tiers.max() > m.num_experts:
    raise BudgetError(f"tier sizes must lie in [0, E={m.num_experts}], got "
                      f"{tiers.tolist()}.")
  budget.check_serves(w, split)
  parts = split_bytes(w, spec, split.slots_per_layer, tiers, split.kv_blocks)
  used, pageable = sum(parts.values()), budget.pageable_bytes(w)
  if used > pageable:
    raise BudgetError(
        f"three-way split needs {used} bytes (raw slots {parts['raw_slots']}"
        f" + tier {parts['tier']} + KV {parts['kv']}) but only {pageable} "
        "are pageable.")


def seconds_at(workload: Workload, spec: TierSpec, slots: np.ndarray,
               tiers: np.ndarray, n: int, kv_blocks: float) -> float:
  """J (seconds per output token) at max batch n."""
  if kv_blocks < workload.floor_blocks:
    return math.inf
  table, base = option_seconds(workload, spec, n, kv_blocks)
  rows = np.arange(slots.size)
  return base + float(table[rows, slots, tiers].sum())


def per_token_seconds(workload: Workload, spec: TierSpec,
                      slots_per_layer: Sequence[int],
                      tier_per_layer: Sequence[int], kv_blocks: float
                      ) -> tuple[float, int]:
  """min over n <= C of J for a three-way split, and the best n."""
  slots = np.asarray(slots_per_layer, np.int64)
  tiers = np.asarray(tier_per_layer, np.int64)
  best = (math.inf, 1)
  for n in range(1, workload.concurrency + 1):
    value = seconds_at(workload, spec, slots, tiers, n, kv_blocks)
    if value < best[0]:
      best = (value, n)
  return best


@dataclasses.dataclass(frozen=True)
class _Front:
  """A layer's options on its Pareto front of seconds against bytes
  (cheapest first), and which of them are lower convex hull vertices."""
  slots: np.ndarray  # [V] raw slots of each option
  tiers: np.ndarray  # [V] tier size of each option
  bytes: np.ndarray  # [V] bytes above the layer's minimum
  seconds: np.ndarray  # [V]
  hull: np.ndarray  # [H] front indices of the hull's vertices, 0 first


def _front(table: np.ndarray, top_k: int, expert: int, coded: int
           ) -> _Front:
  """The front and hull of one layer's options `[E + 1, Z + 1]` (c raw
  slots, z tier experts), from top_k raw slots and no tier."""
  c, z = np.meshgrid(np.arange(top_k, table.shape[0]),
                     np.arange(table.shape[1]), indexing="ij")
  c, z = c.ravel(), z.ravel()
  size = (c - top_k) * expert + z * coded
  sec = table[c, z]
  order = np.lexsort((sec, size))
  # Each option kept costs fewer seconds than every cheaper one (the
  # cheapest, top_k raw slots and no tier, comes first).
  best_before = np.r_[math.inf, np.minimum.accumulate(sec[order])[:-1]]
  keep = order[sec[order] < best_before]
  size, sec = size[keep], sec[keep]
  hull: list[int] = []
  for i in range(keep.size):
    while len(hull) >= 2:
      a, b = hull[-2], hull[-1]
      # b lies on or above the chord a -> i: not a hull vertex.
      if (sec[b] - sec[a]) * (size[i] - size[a]) >= (sec[i] - sec[a]) * (
          size[b] - size[a]):
        hull.pop()
      else:
        break
    hull.append(i)
  return _Front(slots=c[keep], tiers=z[keep], bytes=size, seconds=sec,
                hull=np.asarray(hull))


def _spend(fronts: list[_Front], bytes_left: int) -> tuple[np.ndarray, int]:
  """Buys hull segments steepest first (seconds saved per byte) from each
  layer's cheapest option while they fit; a layer whose next segment does
  not fit stops there. Returns the options (front indices) and the bytes
  spent."""
  pos = np.zeros(len(fronts), np.int64)  # hull positions
  heap = []

  def push(l):
    f, i = fronts[l], pos[l]
    if i + 1 < f.hull.size:
      a, b = f.hull[i], f.hull[i + 1]
      size = int(f.bytes[b] - f.bytes[a])
      heapq.heappush(heap, (-(f.seconds[a] - f.seconds[b]) / size, l, size))

  for l in range(len(fronts)):
    push(l)
  spent = 0
  while heap:
    _, l, size = heapq.heappop(heap)
    if size > bytes_left - spent:
      continue
    pos[l] += 1
    spent += size
    push(l)
  return np.array([f.hull[i] for f, i in zip(fronts, pos)], np.int64), spent


def _choice(fronts: list[_Front], at: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  return (np.array([f.slots[i] for f, i in zip(fronts, at)], np.int64),
          np.array([f.tiers[i] for f, i in zip(fronts, at)], np.int64))


def _fronts(workload: Workload, spec: TierSpec, n: int, kv: float,
            allow_tier: bool = True) -> list[_Front]:
  table, _ = option_seconds(workload, spec, n, kv)
  if not allow_tier:
    table = table[:, :, :1]
  e, coded = workload.expert_bytes, spec.coded_bytes(workload)
  return [_front(table[l], workload.model.top_k, e, coded)
          for l in range(table.shape[0])]


def _for_batch(workload: Workload, spec: TierSpec, pageable: int, n: int,
               allow_tier: bool = True
               ) -> tuple[np.ndarray, np.ndarray, int, dict[str, int]]:
  """The equimarginal three-way split at max batch n: for each pool size
  where the KV model's value per block changes (its grid, and every block
  the budget affords), the rest bought as layer segments steepest first;
  the pool size whose split has the least J, then trades (`_trade`)."""
  w, m = workload, workload.model
  bb = w.block_bytes
  room = pageable - m.num_layers * m.top_k * w.expert_bytes
  most = room // bb
  grid = throughput.tables(w).kv[n - 1].grid
  sizes = np.unique(np.r_[grid[(grid >= w.floor_blocks) & (grid <= most)],
                          most]).astype(np.int64)
  best = None
  for kv in sizes.tolist():
    fronts = _fronts(w, spec, n, kv, allow_tier)
    at, spent = _spend(fronts, room - kv * bb)
    kv_all = kv + (room - kv * bb - spent) // bb  # leftovers: more blocks
    value = seconds_at(w, spec, *_choice(fronts, at), n, float(kv_all))
    if best is None or value < best[0]:
      best = (value, fronts, at, kv_all)
  _, fronts, at, kv = best
  at, kv, trades = _trade(w, spec, n, room, fronts, at, kv)
  slots, tiers = _choice(fronts, at)
  return slots, tiers, int(kv), {"pool_sizes": int(sizes.size),
                                 "trades": trades}


def _trade(workload: Workload, spec: TierSpec, n: int, room: int,
           fronts: list[_Front], at: np.ndarray, kv: int
           ) -> tuple[np.ndarray, int, int]:
  """Trades along the layers' fronts (every option, not only hull
  vertices, as `solver.polish` moves along raw curves): the layer that
  gains most per byte by d = 1..4 more options buys them with KV blocks,
  or the one that loses least sells d options for blocks, or one trades
  with the other (KV takes the difference), while that lowers J at max
  batch n."""
  w = workload
  bb = w.block_bytes

  def used(a):
    return int(sum(f.bytes[i] for f, i in zip(fronts, a)))

  def value(a, b):
    return seconds_at(w, spec, *_choice(fronts, a), n, float(b))

  current = value(at, kv)
  trades = 0
  for _ in range(_MAX_TRADES):
    # The layer that gains most (loses least) per byte by d more (fewer)
    # options along its front, for d = 1.._TRADE_WIDTH.
    ups, downs = [], []
    for d in range(1, _TRADE_WIDTH + 1):
      gain = [(f.seconds[i] - f.seconds[i + d]) / (f.bytes[i + d] - f.bytes[i])
              if i + d < f.bytes.size else -math.inf
              for f, i in zip(fronts, at)]
      loss = [(f.seconds[i - d] - f.seconds[i]) / (f.bytes[i] - f.bytes[i - d])
              if i >= d else math.inf for f, i in zip(fronts, at)]
      if np.isfinite(max(gain)):
        ups.append((int(np.argmax(gain)), d))
      if np.isfinite(min(loss)):
        downs.append((int(np.argmin(loss)), -d))
    moves = [[m] for m in ups + downs] + [
        [u, v] for u in ups for v in downs if u[0] != v[0]]
    options = []
    for move in moves:
      new = at.copy()
      for l, d in move:
        new[l] += d
      rest = (room - used(new)) // bb
      if rest >= w.floor_blocks:
        options.append((value(new, rest), new, int(rest)))
    if not options:
      break
    best, new, rest = min(options, key=lambda o: o[0])
    if not best < current * (1 - 1e-12):
      break
    at, kv, current, trades = new, rest, best, trades + 1
  return at, kv, trades


def equimarginal(workload: Workload, budget: throughput.Budget,
                 spec: TierSpec, allow_tier: bool = True
                 ) -> TieredAllocation:
  """MV-WSA's split of `budget` three ways (see the module docstring).

  `allow_tier=False` splits two ways (no tier) by the same steps and the
  same host bank: the baseline a tier is judged against.

  Raises:
    BudgetError: when the budget cannot hold dense weights, workspace, the
      KV floor and top_k raw slots per layer.
    ValueError: when the workload's curves carry no per-request routing.
  """
  w = workload
  pageable = budget.check(w)
  best = None
  for n in range(1, w.concurrency + 1):
    slots, tiers, kv, counts = _for_batch(w, spec, pageable, n, allow_tier)
    # The engine runs a split at its best max batch, not the one it was
    # bought at.
    value, run_at = per_token_seconds(w, spec, slots, tiers, kv)
    if best is None or value < best[0]:
      best = (value, run_at, slots, tiers, kv, {**counts, "bought_at": n})
  value, n, slots, tiers, kv, counts = best
  split = Split.make(slots, kv, w.model.num_layers)
  validate(w, budget, spec, split, tiers)
  return TieredAllocation(
      split=split, tier_per_layer=tuple(int(z) for z in tiers),
      tokens_per_s=1.0 / value, max_batch=n,
      bytes={**split_bytes(w, spec, slots, tiers, kv), "pageable": pageable},
      details=counts)
