"""Routing curves: per-layer LRU misses per decode step, by concurrency.

Two ways to get them:

  * `curves_from_trace` rebatches a trace's requests in waves of n
    (`rebatch`) and runs `sim.mrc.mattson` on each level; each level is
    measured in steady state (the trace replayed twice, the second pass
    counted), so the first use of an expert is not charged as a miss at
    every capacity. It also keeps the trace's per-request routing
    (`RoutingCurves.routing`), from which `alloc.throughput` measures the
    engine's own pass order at every batch size of a workload
    (`alloc.steady.engine_curves`: prefill passes that evict, overflow
    reloads, every level 1..C).
  * hand-made or observed curves (tests, the online controller): decode
    misses at a few levels, no prefill curves.

Between measured levels the curves are interpolated linearly in n; below
the lowest level they scale to 0 at n = 0; above the highest level the miss
ratio is kept and the references per step scale like the union of n
tokens' top-k sets under uniform routing, E (1 - (1 - K/E)^n). Per-pass
prefill curves are not scaled outside the measured levels.

`synthetic_trace` builds traces whose layer groups have different locality
(the `traces.synthetic` generators side by side).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from wisp_jax.alloc.steady import EngineCurves, RequestRouting
from wisp_jax.sim import mrc
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import PREFILL, RoutingTrace


def union_size(num_experts: int, top_k: int, tokens: float | np.ndarray
               ) -> np.ndarray:
  """Expected distinct experts of `tokens` tokens under uniform routing."""
  tokens = np.maximum(np.asarray(tokens, np.float64), 0.0)
  return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


# Optional per-level arrays `[N, L, E + 1]` (or `[N, L]`), and whether
# they are per decode step (scaled below and above the measured levels).
OPTIONAL = {"loads_per_step": True, "prefill_misses": False,
            "prefill_loads": False, "prefill_references": False,
            "eviction_misses": False, "eviction_loads": False}


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingCurves:
  """Per-layer LRU traffic per decode step, by capacity and concurrency.

  Attributes:
    concurrency: `[N]` float64 increasing, mean requests per decode step of
      each measured level.
    misses_per_step: `[N, L, E + 1]` float64 LRU misses per decode step of
      layer l with capacity c (index c).
    references_per_step: `[N, L]` float64 distinct experts a step needs.
    top_k: K of the routing.
    source: provenance (trace source and levels).
    loads_per_step: `[N, L, E + 1]` copies per decode step (misses plus
      the pager's overflow reloads); None: equal to the misses.
    prefill_misses, prefill_loads: `[N, L, E + 1]` per prefill pass, or
      None (then a prompt is taken to route uniformly, see
      `alloc.throughput`).
    prefill_references: `[N, L]` experts a prefill pass needs.
    eviction_misses, eviction_loads: `[N, L, E + 1]` decode misses/loads
      that one prefill pass adds (it evicts the decode working set).
    routing: the trace's per-request routing, from which the engine's own
      pass order is measured for a workload's lengths (None: use the
      arrays as they are).
  """
  concurrency: np.ndarray
  misses_per_step: np.ndarray
  references_per_step: np.ndarray
  top_k: int
  source: str = ""
  loads_per_step: np.ndarray | None = None
  prefill_misses: np.ndarray | None = None
  prefill_loads: np.ndarray | None = None
  prefill_references: np.ndarray | None = None
  eviction_misses: np.ndarray | None = None
  eviction_loads: np.ndarray | None = None
  routing: RequestRouting | None = None

  def __post_init__(self):
    levels = np.asarray(self.concurrency, np.float64)
    misses = np.asarray(self.misses_per_step, np.float64)
    refs = np.asarray(self.references_per_step, np.float64)
    if levels.ndim != 1 or levels.size < 1 or np.any(levels <= 0):
      raise ValueError(f"concurrency must be a non-empty [N] array of "
                       f"positive levels, got {levels.tolist()}.")
    if np.any(np.diff(levels) <= 0):
      raise ValueError(f"concurrency levels must increase, got "
                       f"{levels.tolist()}.")
    if misses.ndim != 3 or misses.shape[0] != levels.size:
      raise ValueError(f"misses_per_step must be [N={levels.size}, L, E+1], "
                       f"got shape {misses.shape}.")
    if refs.shape != misses.shape[:2]:
      raise ValueError(f"references_per_step must be [N, L] = "
                       f"{misses.shape[:2]}, got {refs.shape}.")
    if np.any(np.diff(misses, axis=2) > 1e-9):
      raise ValueError("misses_per_step must not increase with capacity "
                       "(LRU's inclusion property).")
    if not 1 <= self.top_k <= misses.shape[2] - 1:
      raise ValueError(f"top_k={self.top_k} must lie in [1, E="
                       f"{misses.shape[2] - 1}].")
    object.__setattr__(self, "concurrency", levels)
    object.__setattr__(self, "misses_per_step", misses)
    object.__setattr__(self, "references_per_step", refs)
    for name in OPTIONAL:
      value = getattr(self, name)
      if value is None:
        continue
      value = np.asarray(value, np.float64)
      want = refs.shape if name == "prefill_references" else misses.shape
      if value.shape != want:
        raise ValueError(f"{name} must have shape {want}, got "
                         f"{value.shape}.")
      object.__setattr__(self, name, value)

  @classmethod
  def from_engine(cls, curves: EngineCurves, top_k: int, source: str = ""
                  ) -> "RoutingCurves":
    """Curves of `steady.engine_curves` (decode misses cannot increase
    with capacity; measured ones can only by float noise)."""
    misses = np.minimum.accumulate(curves.misses, axis=2)
    return cls(concurrency=curves.concurrency, misses_per_step=misses,
               references_per_step=curves.references, top_k=top_k,
               source=source, loads_per_step=curves.loads,
               prefill_misses=curves.prefill_misses,
               prefill_loads=curves.prefill_loads,
               prefill_references=curves.prefill_references,
               eviction_misses=curves.eviction_misses,
               eviction_loads=curves.eviction_loads)

  @property
  def num_layers(self) -> int:
    return self.misses_per_step.shape[1]

  @property
  def num_experts(self) -> int:
    return self.misses_per_step.shape[2] - 1

  @property
  def has_prefill(self) -> bool:
    """Whether prefill passes were measured (else a model fills them in)."""
    return self.prefill_loads is not None

  def _weights(self, flat: np.ndarray):
    levels = self.concurrency
    idx = np.clip(np.searchsorted(levels, flat) - 1, 0, levels.size - 1)
    hi = np.minimum(idx + 1, levels.size - 1)
    span = np.where(hi > idx, levels[hi] - levels[idx], 1.0)
    frac = np.clip((flat - levels[idx]) / span, 0.0, 1.0)
    below = flat < levels[0]
    scale = np.where(below, flat / levels[0], 1.0)
    above = flat > levels[-1]
    grow = union_size(self.num_experts, self.top_k, flat) / union_size(
        self.num_experts, self.top_k, levels[-1])
    return idx, hi, frac, np.where(above, grow, scale)

  def _blend(self, values: np.ndarray, n: np.ndarray, per_step: bool
             ) -> np.ndarray:
    flat = np.atleast_1d(n)
    idx, hi, frac, scale = self._weights(flat)
    shape = (-1,) + (1,) * (values.ndim - 1)
    out = ((1 - frac).reshape(shape) * values[idx]
           + frac.reshape(shape) * values[hi])
    if per_step:
      out = out * scale.reshape(shape)
    if np.ndim(n) == 0:
      return out[0]
    return out.reshape(np.shape(n) + values.shape[1:])

  def at(self, concurrency: float | Sequence[float] | np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Curves at concurrency n (scalar or `[M]`), see the module docstring.

    Returns:
      misses per step `[..., L, E + 1]` and references per step `[..., L]`.
    """
    n = np.asarray(concurrency, np.float64)
    return (self._blend(self.misses_per_step, n, True),
            self._blend(self.references_per_step, n, True))

  def at_all(self, concurrency: float | Sequence[float] | np.ndarray
             ) -> dict[str, np.ndarray | None]:
    """Every array at concurrency n: `misses`, `references` and the
    optional fields (`loads_per_step` as `loads`; None where absent)."""
    n = np.asarray(concurrency, np.float64)
    misses, refs = self.at(n)
    out: dict[str, np.ndarray | None] = {"misses": misses,
                                          "references": refs}
    for name, per_step in OPTIONAL.items():
      value = getattr(self, name)
      key = "loads" if name == "loads_per_step" else name
      out[key] = None if value is None else self._blend(value, n, per_step)
    if out["loads"] is None:
      out["loads"] = misses
    return out


def rebatch(trace: RoutingTrace, batch: int) -> RoutingTrace:
  """The trace's decode tokens replayed with `batch` requests per step.

  Requests (in order of first appearance) run in waves of `batch`; the
  t-th decode token of each request of wave w goes to step offset(w) + t,
  where a wave lasts as long as its longest request. Prefill events are
  dropped (their routing is not a decode step's).
  """
  if batch < 1:
    raise ValueError(f"batch must be >= 1 request, got {batch}.")
  decode = trace.select(trace.phase != PREFILL)
  if decode.num_tokens == 0:
    raise ValueError(f"trace {trace.source!r} has no decode events.")
  order = np.lexsort((decode.position, decode.step, decode.request))
  request = decode.request[order]
  starts = np.flatnonzero(np.r_[True, request[1:] != request[:-1]])
  lengths = np.diff(np.r_[starts, request.size])
  ordinal = np.arange(request.size) - np.repeat(starts, lengths)
  first_seen = decode.step[order][starts]
  rank = np.empty(starts.size, np.int64)
  rank[np.argsort(first_seen, kind="stable")] = np.arange(starts.size)
  wave = rank // batch
  wave_len = np.zeros(wave.max() + 1, np.int64)
  np.maximum.at(wave_len, wave, lengths)
  offset = np.r_[0, np.cumsum(wave_len)[:-1]]
  step = np.repeat(offset[wave], lengths) + ordinal
  resort = np.lexsort((request, step))
  picked = order[resort]
  return dataclasses.replace(
      decode, step=step[resort], request=decode.request[picked],
      phase=decode.phase[picked], position=decode.position[picked],
      ids=decode.ids[picked], weights=decode.weights[picked],
      source=f"{trace.source} rebatched to {batch}")


def steady_mattson(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Steady-state LRU misses and references of `[S, L, E]` needed masks:
  the steps replayed twice and the second pass counted, so an expert's
  first use is a miss only if its reuse distance says so.

  Returns:
    misses `[L, E + 1]` and references `[L]`, totals over the S steps.
  """
  once = mrc.mattson(masks)
  twice = mrc.mattson(np.concatenate([masks, masks]))
  return (twice.misses - once.misses).astype(np.float64), (
      once.references.astype(np.float64))


def curves_from_trace(trace: RoutingTrace,
                      levels: Sequence[int] | None = None) -> RoutingCurves:
  """LRU curves of `trace` at several concurrency levels (steady state).

  Args:
    trace: a routing trace with request ids. A trace with a single request
      id (batched logs without request identity) gives one level: its own
      steps, at its mean tokens per decode step, and no per-request
      routing.
    levels: requests per step to measure (default: 1, 2, 4, ... up to the
      number of requests, and that number).

  Returns:
    the curves; each level's concurrency is its measured mean tokens per
    step; `routing` holds the trace's requests (two or more).
  """
  num_requests = int(np.unique(trace.request).size)
  if num_requests < 2:
    decode = trace.select(trace.phase != PREFILL)
    traces = [decode]
  else:
    if levels is None:
      levels = sorted({min(2**i, num_requests) for i in range(
          int(math.log2(num_requests)) + 2)})
    traces = [rebatch(trace, int(n)) for n in sorted(set(levels))]
  concurrency, misses, refs = [], [], []
  for t in traces:
    masks = t.needed_masks()
    steps = max(masks.shape[0], 1)
    level_misses, level_refs = steady_mattson(masks)
    concurrency.append(t.num_tokens / steps)
    misses.append(level_misses / steps)
    refs.append(level_refs / steps)
  # Rebatching at a level above the request count repeats the top level.
  concurrency, keep = np.unique(np.asarray(concurrency), return_index=True)
  return RoutingCurves(
      concurrency=concurrency, misses_per_step=np.stack(misses)[keep],
      references_per_step=np.stack(refs)[keep], top_k=trace.top_k,
      source=f"{trace.source}; levels {np.round(concurrency, 2).tolist()}",
      routing=(RequestRouting.from_trace(trace) if num_requests >= 2
               else None))


def synthetic_trace(num_layers: int, num_experts: int, top_k: int,
                    groups: Sequence[Mapping[str, Any]], num_requests: int,
                    tokens_per_request: int, seed: int = 0) -> RoutingTrace:
  """A synthetic trace whose layers come in groups of different locality.

  Args:
    num_layers: L; split into `len(groups)` contiguous, near-equal groups.
    num_experts: E.
    top_k: K.
    groups: one dict per group: `kind` ("uniform", "zipf", "sticky",
      "cross_layer") and that generator's keyword arguments (`alpha`,
      `p_keep`, `p_follow`).
    num_requests: requests (all in one wave).
    tokens_per_request: decode tokens per request.
    seed: base seed (group g uses seed + g).

  Returns:
    the trace, `[N, L, K]` ids.
  """
  if not groups or len(groups) > num_layers:
    raise ValueError(f"need 1..L={num_layers} layer groups, got "
                     f"{len(groups)}.")
  sizes = np.diff(np.linspace(0, num_layers, len(groups) + 1).round()
                  ).astype(int)
  parts = []
  for g, (size, spec) in enumerate(zip(sizes, groups)):
    spec = dict(spec)
    kind = spec.pop("kind", "sticky")
    generators = {"uniform": synthetic.uniform, "zipf": synthetic.zipf,
                  "sticky": synthetic.sticky,
                  "cross_layer": synthetic.cross_layer}
    if kind not in generators:
      raise ValueError(f"unknown synthetic trace kind {kind!r}; use one of "
                       f"{sorted(generators)}.")
    parts.append(generators[kind](
        int(size), num_experts, top_k, num_requests, tokens_per_request,
        num_requests, seed=seed + g, **spec))
  first = parts[0]
  return dataclasses.replace(
      first, ids=np.concatenate([p.ids for p in parts], axis=1),
      weights=np.concatenate([p.weights for p in parts], axis=1),
      source="; ".join(p.source for p in parts))
