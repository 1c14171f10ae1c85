"""Routing curves: per-layer LRU misses per decode step, by concurrency.

The expert working set of a decode step grows with the number of requests
sharing it, so `curves_from_trace` measures `sim.mrc.mattson` curves at
several concurrency levels n: the trace's requests are replayed in waves
of n (`rebatch`). Between measured levels the curves are interpolated
linearly in n; below the lowest level they scale to 0 at n = 0; above the
highest level the miss ratio is kept and the references per step scale like
the union of n tokens' top-k sets under uniform routing,
E (1 - (1 - K/E)^n).

`synthetic_trace` builds traces whose layer groups have different locality
(the `traces.synthetic` generators side by side).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from wisp_jax.sim import mrc
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import PREFILL, RoutingTrace


def union_size(num_experts: int, top_k: int, tokens: float | np.ndarray
               ) -> np.ndarray:
  """Expected distinct experts of `tokens` tokens under uniform routing."""
  tokens = np.maximum(np.asarray(tokens, np.float64), 0.0)
  return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingCurves:
  """Per-layer LRU misses per decode step, by capacity and concurrency.

  Attributes:
    concurrency: `[N]` float64 increasing, mean requests per decode step of
      each measured level.
    misses_per_step: `[N, L, E + 1]` float64 LRU misses per step of layer l
      with capacity c (index c).
    references_per_step: `[N, L]` float64 distinct experts a step needs.
    top_k: K of the routing.
    source: provenance (trace source and levels).
  """
  concurrency: np.ndarray
  misses_per_step: np.ndarray
  references_per_step: np.ndarray
  top_k: int
  source: str = ""

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

  @property
  def num_layers(self) -> int:
    return self.misses_per_step.shape[1]

  @property
  def num_experts(self) -> int:
    return self.misses_per_step.shape[2] - 1

  def at(self, concurrency: float | Sequence[float] | np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:
    """Curves at concurrency n (scalar or `[M]`), see the module docstring.

    Returns:
      misses per step `[..., L, E + 1]` and references per step `[..., L]`.
    """
    n = np.asarray(concurrency, np.float64)
    flat = np.atleast_1d(n)
    levels = self.concurrency
    idx = np.clip(np.searchsorted(levels, flat) - 1, 0, levels.size - 1)
    hi = np.minimum(idx + 1, levels.size - 1)
    span = np.where(hi > idx, levels[hi] - levels[idx], 1.0)
    frac = np.clip((flat - levels[idx]) / span, 0.0, 1.0)[:, None]
    misses = ((1 - frac[..., None]) * self.misses_per_step[idx]
              + frac[..., None] * self.misses_per_step[hi])
    refs = (1 - frac) * self.references_per_step[idx] + (
        frac * self.references_per_step[hi])
    below = flat < levels[0]
    scale = np.where(below, flat / levels[0], 1.0)
    above = flat > levels[-1]
    grow = union_size(self.num_experts, self.top_k, flat) / union_size(
        self.num_experts, self.top_k, levels[-1])
    scale = np.where(above, grow, scale)
    misses = misses * scale[:, None, None]
    refs = refs * scale[:, None]
    if n.ndim == 0:
      return misses[0], refs[0]
    return misses.reshape(n.shape + misses.shape[1:]), refs.reshape(
        n.shape + refs.shape[1:])


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


def curves_from_trace(trace: RoutingTrace,
                      levels: Sequence[int] | None = None) -> RoutingCurves:
  """LRU curves of `trace` at several concurrency levels (one mattson each).

  Args:
    trace: a routing trace with request ids. A trace with a single request
      id (batched logs without request identity) gives one level: its own
      steps, at its mean tokens per decode step.
    levels: requests per step to measure (default: 1, 2, 4, ... up to the
      number of requests, and that number).

  Returns:
    the curves; each level's concurrency is its measured mean tokens per
    step.
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
    curve = mrc.mattson(t)
    concurrency.append(t.num_tokens / max(curve.num_steps, 1))
    misses.append(curve.misses / max(curve.num_steps, 1))
    refs.append(curve.references / max(curve.num_steps, 1))
  # Rebatching at a level above the request count repeats the top level.
  concurrency, keep = np.unique(np.asarray(concurrency), return_index=True)
  return RoutingCurves(
      concurrency=concurrency, misses_per_step=np.stack(misses)[keep],
      references_per_step=np.stack(refs)[keep], top_k=trace.top_k,
      source=f"{trace.source}; levels {np.round(concurrency, 2).tolist()}")


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
