"""Miss-ratio curves of per-layer LRU expert caches, all capacities at once.

Reference model (what a "hit" means; the pager's LRU replay follows it):

  * Each layer has its own cache; layers never interact.
  * Time advances in steps (distinct trace step values, in order). At step
    t, layer l *references* the set U of distinct experts that any of the
    step's tokens routed to in that layer: an expert needed by several
    tokens of a step is one reference, and all of U is accessed at once.
  * Each referenced expert e has the priority key
        key(e) = ordinal(last step that referenced e) * E + (E - 1 - e),
    i.e. more recent is higher, and among experts last used in the same
    step the LOWER id ranks higher (is kept longer). Keys are unique
    within a layer. This is the pager's LRU: retention key = last-use
    step, ties kept by lower id (`wisp_jax.paging.policies`).
  * Caches start empty. An LRU cache of capacity c holds, just before
    step t, the c experts with the highest keys among all experts
    referenced before t (fewer if fewer were ever referenced). At step t:
    hits = |U & cache|, misses = |U - cache|; then every e in U gets
    key(e) updated to step t. Equivalently: evict the lowest-key experts
    that are not in U to make room for U's misses; if |U| > c, all of U
    is loaded for the step (transiently) and the cache keeps the c
    lowest-id experts of U.
  * Stack distance of a reference to e at step t: the number of experts
    whose key exceeds key(e) before step t (infinite if e was never
    referenced: a cold miss). A capacity-c cache hits it iff distance < c,
    because the cache is the top c of the key order (LRU's inclusion
    property). Mattson's one pass over the trace records every reference's
    distance, so hits(c) = #references with distance < c for every c.

Counts are in experts (int64); multiply by `MoEConfig.expert_bytes()` on
the host for bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wisp_jax.traces.trace import RoutingTrace


@dataclasses.dataclass(frozen=True)
class MissRatioCurve:
  """Per-layer LRU hit counts for every capacity 0..E.

  Attributes:
    references: `[L]` int64 expert references (sum over steps of |U|).
    cold: `[L]` int64 first references (missed at every capacity).
    distance_histogram: `[L, E]` int64; `[l, d]` counts references with
      stack distance d (cold references are not in it).
    hits: `[L, E + 1]` int64; `[l, c]` = hits of a capacity-c LRU cache
      of layer l (indexed by capacity, so `hits[:, 0]` is 0).
    num_steps: S, the steps replayed.
  """
  references: np.ndarray
  cold: np.ndarray
  distance_histogram: np.ndarray
  hits: np.ndarray
  num_steps: int

  @property
  def num_layers(self) -> int:
    return self.hits.shape[0]

  @property
  def num_experts(self) -> int:
    return self.hits.shape[1] - 1

  @property
  def misses(self) -> np.ndarray:
    """`[L, E + 1]` int64 misses, indexed by capacity."""
    return self.references[:, None] - self.hits

  @property
  def miss_ratio(self) -> np.ndarray:
    """`[L, E + 1]` float64 misses / references (0 where no references)."""
    refs = np.maximum(self.references, 1)[:, None]
    return self.misses / refs

  def hits_at(self, capacities: int | Sequence[int] | np.ndarray
              ) -> np.ndarray:
    """`[L]` hits with `capacities` slots per layer (int or `[L]`).

    Capacities above E behave as E (nothing is ever evicted).
    """
    caps = np.broadcast_to(np.asarray(capacities, np.int64),
                           (self.num_layers,))
    if np.any(caps < 0):
      raise ValueError(f"capacities must be >= 0, got {caps.tolist()}.")
    caps = np.minimum(caps, self.num_experts)
    return self.hits[np.arange(self.num_layers), caps]

  def misses_at(self, capacities: int | Sequence[int] | np.ndarray
                ) -> np.ndarray:
    """`[L]` misses with `capacities` slots per layer (int or `[L]`)."""
    return self.references - self.hits_at(capacities)


def _masks(trace_or_masks: RoutingTrace | np.ndarray) -> np.ndarray:
  if isinstance(trace_or_masks, RoutingTrace):
    return trace_or_masks.needed_masks()
  masks = np.asarray(trace_or_masks)
  if masks.ndim != 3 or masks.dtype != bool:
    raise ValueError(f"expected a RoutingTrace or [S, L, E] bool needed "
                     f"masks, got {masks.dtype} array of shape {masks.shape}.")
  return masks


def lru_priority(step_ordinal: np.ndarray | int, expert: np.ndarray | int,
                 num_experts: int) -> np.ndarray:
  """The LRU key of the module docstring: higher is more recently used."""
  return (np.asarray(step_ordinal, np.int64) * num_experts
          + (num_experts - 1 - np.asarray(expert, np.int64)))


@jax.jit
def _scan(masks: jax.Array, key: jax.Array, start: jax.Array,
          capacities: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LRU stack distances of a chunk of steps (one jitted scan, all layers).

  Args:
    masks: `[S, L, E]` bool needed sets of steps start .. start + S - 1.
    key: `[L, E]` int32 LRU keys before the chunk (-1: never referenced).
    start: `[]` int32 ordinal of the chunk's first step.
    capacities: `[C]` int32 capacities whose per-step hits to return.

  Returns:
    the chunk's distance histogram `[L, E + 1]` int32 (column E: cold
    references and non-references are not counted there: see below), its
    per-step hits `[S, L, C]` int32 at each capacity, and the keys after it.
  """
  num_layers, num_experts = masks.shape[1:]
  tie = num_experts - 1 - jnp.arange(num_experts, dtype=jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(num_layers)[:, None],
                          (num_layers, num_experts))

  def step(carry, xs):
    key, hist = carry
    t, needed = xs
    # [L, E]: experts ranked above each one, i.e. its stack distance.
    above = jnp.sum(key[:, None, :] > key[:, :, None], axis=2,
                    dtype=jnp.int32)
    warm = needed & (key >= 0)
    distance = jnp.where(warm, above, num_experts)
    hist = hist.at[rows, distance].add(warm.astype(jnp.int32))
    hits = jnp.sum(distance[:, :, None] < capacities, axis=1,
                   dtype=jnp.int32)
    return (jnp.where(needed, t * num_experts + tie, key), hist), hits

  ticks = start + jnp.arange(masks.shape[0], dtype=jnp.int32)
  hist = jnp.zeros((num_layers, num_experts + 1), jnp.int32)
  (key, hist), hits = jax.lax.scan(step, (key, hist), (ticks, masks))
  return hist, hits, key


# Steps x layers x experts of the needed masks of one chunk.
_CHUNK_ELEMENTS = 2**24


def lru_scan(masks: np.ndarray, capacities=()
             ) -> tuple[np.ndarray, np.ndarray]:
  """Stack-distance pass over `[S, L, E]` needed masks, chunked.

  Returns:
    the distance histogram `[L, E]` int64 (cold references excluded) and
    the per-step hits `[S, L, C]` int32 at each of `capacities`.
  """
  num_steps, num_layers, num_experts = masks.shape
  if (num_steps + 1) * num_experts >= 2**31:
    raise ValueError(f"{num_steps} steps x E={num_experts} overflow the "
                     "int32 LRU keys; replay the trace in parts.")
  caps = jnp.asarray(np.asarray(capacities, np.int32).reshape(-1))
  chunk = max(1, _CHUNK_ELEMENTS // (num_layers * num_experts))
  chunk = min(1 << (chunk.bit_length() - 1),  # a power of two: few shapes
              1 << max(num_steps - 1, 0).bit_length())
  key = jnp.full((num_layers, num_experts), -1, jnp.int32)
  hist = np.zeros((num_layers, num_experts + 1), np.int64)
  hits = []
  for start in range(0, num_steps, chunk):
    part = masks[start:start + chunk]
    real = part.shape[0]
    if real < chunk:  # pad with empty steps, which change nothing
      part = np.pad(part, ((0, chunk - real), (0, 0), (0, 0)))
    part_hist, part_hits, key = _scan(jnp.asarray(part), key,
                                      jnp.int32(start), caps)
    hist += np.asarray(part_hist)
    hits.append(np.asarray(part_hits)[:real])
  hits = (np.concatenate(hits) if hits else
          np.zeros((0, num_layers, caps.size), np.int32))
  return hist[:, :num_experts], hits


def mattson(trace_or_masks: RoutingTrace | np.ndarray) -> MissRatioCurve:
  """One-pass LRU stack-distance analysis of every layer (a jitted scan).

  Args:
    trace_or_masks: a trace, or `[S, L, E]` bool needed masks
      (`RoutingTrace.needed_masks()`).

  Returns:
    the curve for capacities 0..E of every layer.
  """
  masks = _masks(trace_or_masks)
  num_steps, num_layers, _ = masks.shape
  hist, _ = lru_scan(masks)
  references = masks.sum(axis=(0, 2)).astype(np.int64)
  cold = references - hist.sum(axis=1)
  hits = np.concatenate([np.zeros((num_layers, 1), np.int64),
                         np.cumsum(hist, axis=1)], axis=1)
  return MissRatioCurve(references=references, cold=cold,
                        distance_histogram=hist, hits=hits,
                        num_steps=num_steps)


def working_set_sizes(trace_or_masks: RoutingTrace | np.ndarray,
                      taus: Sequence[int]) -> np.ndarray:
  """Denning's mean working-set size per layer for each window `tau`.

  W(t, tau) is the set of experts a layer referenced in steps
  t - tau + 1 .. t. The mean runs over the full windows, t = tau - 1 ..
  S - 1; a tau longer than the trace gives the one window of all steps.

  Args:
    trace_or_masks: a trace or `[S, L, E]` bool needed masks.
    taus: window lengths in steps, each >= 1.

  Returns:
    `[L, len(taus)]` float64 mean |W(t, tau)|, in experts.
  """
  masks = _masks(trace_or_masks)
  num_steps, num_layers, _ = masks.shape
  taus = [int(tau) for tau in taus]
  if any(tau < 1 for tau in taus):
    raise ValueError(f"window lengths tau must be >= 1 step, got {taus}.")
  out = np.zeros((num_layers, len(taus)))
  if num_steps == 0:
    return out
  for l in range(num_layers):
    counts = np.concatenate([np.zeros((1, masks.shape[2]), np.int64),
                             np.cumsum(masks[:, l], axis=0)])  # [S + 1, E]
    for j, tau in enumerate(taus):
      tau = min(tau, num_steps)
      in_window = counts[tau:] - counts[:-tau] > 0  # [S - tau + 1, E]
      out[l, j] = in_window.sum(axis=1).mean()
  return out


def reuse_intervals(trace_or_masks: RoutingTrace | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Histogram of steps between consecutive references of an expert.

  Reuse *distance* in distinct experts is `MissRatioCurve.
  distance_histogram`; this is the reuse *interval* in steps.

  Args:
    trace_or_masks: a trace or `[S, L, E]` bool needed masks.

  Returns:
    `hist` `[L, max(S, 1)]` int64, `hist[l, g]` = references of layer l
    whose expert was previously referenced g steps earlier (g >= 1;
    column 0 stays 0), and `cold` `[L]` int64 first references.
  """
  masks = _masks(trace_or_masks)
  num_steps, num_layers, num_experts = masks.shape
  width = max(num_steps, 1)
  last = np.full((num_layers, num_experts), -1, np.int64)
  flat = np.zeros(num_layers * width, np.int64)
  cold = np.zeros(num_layers, np.int64)
  for t in range(num_steps):
    needed = masks[t]
    cold += (needed & (last < 0)).sum(axis=1)
    layer, expert = np.nonzero(needed & (last >= 0))
    flat += np.bincount(layer * width + (t - last[layer, expert]),
                        minlength=num_layers * width)
    last = np.where(needed, t, last)
  return flat.reshape(num_layers, width), cold
