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
import functools
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


WORD_BITS = 64


def num_words(num_experts: int) -> int:
  """uint64 words of one layer's needed-set bitmask."""
  return -(-num_experts // WORD_BITS)


def words_of_masks(masks: np.ndarray) -> np.ndarray:
  """`[S, L, E]` bool needed masks as `[S, L, W]` uint64 bitmasks: expert
  e is bit e % 64 of word e // 64 (the layout `lru_scan` reads)."""
  packed = np.packbits(masks, axis=-1, bitorder="little")  # [S, L, E / 8]
  width = 8 * num_words(masks.shape[-1])
  packed = np.pad(packed, ((0, 0), (0, 0), (0, width - packed.shape[-1])))
  return np.ascontiguousarray(packed).view("<u8").astype(np.uint64)


def words_of_ids(ids: np.ndarray, num_experts: int) -> np.ndarray:
  """`[..., K]` expert ids, distinct along K and in [0, E) (a
  `RoutingTrace`'s are checked when it is built), as `[..., W]` uint64
  bitmasks (`words_of_masks`'s layout)."""
  ids = np.asarray(ids)
  width = num_words(num_experts)
  # Row e of word w's table: expert e's bit if e lies in word w.
  e = np.arange(num_experts)
  bit = np.left_shift(np.uint64(1), (e % WORD_BITS).astype(np.uint64))
  out = np.zeros(ids.shape[:-1] + (width,), np.uint64)
  for w in range(width):
    table = np.where(e // WORD_BITS == w, bit, np.uint64(0))
    word = np.take(table, ids[..., 0])  # one k at a time: small temporaries
    for k in range(1, ids.shape[-1]):
      word |= np.take(table, ids[..., k])
    out[..., w] = word
  return out


@functools.partial(jax.jit, static_argnames=("num_experts", "histogram",
                                             "per_expert"))
def _scan(needed: jax.Array, above: tuple[jax.Array, ...],
          capacities: jax.Array, num_experts: int, histogram: bool,
          per_expert: bool = False
          ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...], jax.Array]:
  """LRU stack distances of a chunk of steps (one jitted scan, all layers).

  The state is, per layer and expert e, the bitmask `above[w][l, e]` (word
  w) of the experts whose key exceeds e's: those referenced since e's last
  reference, plus the lower ids referenced with it. e's stack distance is
  its popcount; a never-referenced expert's mask holds all E experts, so
  distance E marks a cold reference (a warm one's mask never holds e).
  A step costs O(L E W) word operations, not the O(L E^2) of comparing
  keys pairwise. Traced with 64-bit types enabled (`lru_scan`); the words
  are separate arrays because a trailing word axis compiles to much slower
  code on CPU.

  Args:
    needed: the chunk's needed sets, `[S, L, W]` uint64 bitmasks
      (`words_of_masks`), or `[S, L, K]` int expert ids distinct along K
      (one token per step; id E: none), turned into bitmasks in the scan.
    above: W arrays `[L, E]` uint64, the state before the chunk.
    capacities: `[C]` int32 capacities whose per-step hits to return.
    num_experts: E.
    histogram: also count distances (else the histogram stays zero).
    per_expert: also count each expert's misses at each capacity.

  Returns:
    the chunk's distance histogram `[L, E + 1]` int32 (column E: cold
    references), its per-step hits `[S, L, C]` int32 at each capacity, the
    state after it, and the chunk's misses `[L, E, C]` int32 of each expert
    at each capacity (zero without `per_expert`).
  """
  num_layers = needed.shape[1]
  expert = jnp.arange(num_experts)
  word = expert // WORD_BITS
  bit = (expert % WORD_BITS).astype(jnp.uint64)
  ones, zero = jnp.uint64(2**64 - 1), jnp.uint64(0)
  # Per word w, `[E]`: the bits of the experts with a lower id than e.
  lower = [jnp.where(w < word, ones, zero)
           | jnp.where(w == word, (jnp.uint64(1) << bit) - 1, zero)
           for w in range(len(above))]
  rows = jnp.broadcast_to(jnp.arange(num_layers)[:, None],
                          (num_layers, num_experts))
  if needed.dtype == jnp.uint64:
    to_words = lambda now: [now[:, w] for w in range(len(above))]
  else:
    # Row e of word w's table: e's bit if it lies in word w (row E: none).
    tables = [jnp.append(jnp.where(word == w, jnp.uint64(1) << bit, zero),
                         zero) for w in range(len(above))]
    to_words = lambda now: [jax.lax.reduce(
        table[now.astype(jnp.int32)], zero, jax.lax.bitwise_or, (1,))
                            for table in tables]

  def step(carry, now):
    above, hist, missed = carry
    now = [word_[:, None] for word_ in to_words(now)]  # W x [L, 1]
    needed = (now[0] >> bit) & 1  # [L, E]
    for w in range(1, len(now)):
      needed = jnp.where(word == w, (now[w] >> bit) & 1, needed)
    needed = needed.astype(bool)
    distance = sum(jax.lax.population_count(a).astype(jnp.int32)
                   for a in above)
    if histogram:
      hist = hist.at[rows, distance].add(needed.astype(jnp.int32))
    hit = (distance[:, :, None] < capacities) & needed[:, :, None]
    hits = jnp.sum(hit, axis=1, dtype=jnp.int32)
    if per_expert:
      missed = missed + (needed[:, :, None] & ~hit).astype(jnp.int32)
    above = tuple(jnp.where(needed, now_w & lower_w, a | now_w)
                  for a, now_w, lower_w in zip(above, now, lower))
    return (above, hist, missed), hits

  hist = jnp.zeros((num_layers, num_experts + 1), jnp.int32)
  missed = jnp.zeros((num_layers, num_experts, capacities.shape[0]),
                     jnp.int32)
  (above, hist, missed), hits = jax.lax.scan(step, (above, hist, missed),
                                             needed)
  return hist, hits, above, missed


def _cold_state(num_layers: int, num_experts: int) -> tuple[jax.Array, ...]:
  """Before any reference every expert sees all E experts above it (built
  on the host and copied: `jnp.full` costs more than a small scan)."""
  bits = np.arange(WORD_BITS * num_words(num_experts)) < num_experts
  valid = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
  return tuple(jnp.asarray(np.full((num_layers, num_experts), v, np.uint64))
               for v in valid)


# Steps x layers x words (or ids) of one chunk's needed sets.
_CHUNK_ELEMENTS = 2**22


def lru_scan(needed: np.ndarray, num_experts: int, capacities=(),
             histogram: bool = True, per_expert: bool = False) -> tuple:
  """Stack-distance pass over a trace's needed sets, chunked.

  Args:
    needed: `[S, L, W]` uint64 bitmasks (`words_of_masks(masks)`,
      `words_of_ids(...)`), or, for one token per step, `[S, L, K]` signed
      integer expert ids, distinct along K and in [0, E) (a `RoutingTrace`'s
      ids: the bitmasks are then built inside the scan).
    num_experts: E.
    capacities: capacities whose per-step hits to return.
    histogram: count distances (Mattson); skip it when only hits matter.
    per_expert: also return each expert's misses at each capacity.

  Returns:
    the distance histogram `[L, E]` int64 (cold references excluded; zero
    without `histogram`), the per-step hits `[S, L, C]` int32 at each of
    `capacities` and, with `per_expert`, the misses `[L, E, C]` int64 of
    each expert at each capacity.
  """
  num_steps, num_layers, width = needed.shape
  if needed.dtype == np.uint64:
    if width != num_words(num_experts):
      raise ValueError(f"bitmasks have {width} words per layer; "
                       f"E={num_experts} needs {num_words(num_experts)}.")
    empty = 0
  elif np.issubdtype(needed.dtype, np.signedinteger):
    empty = num_experts  # the id of "no expert" in the scan's tables
  else:
    raise ValueError("needed must be uint64 bitmasks or signed integer "
                     f"expert ids, got {needed.dtype}.")
  caps = np.asarray(capacities, np.int32).reshape(-1)
  chunk = max(1, _CHUNK_ELEMENTS // (num_layers * width))
  chunk = min(1 << (chunk.bit_length() - 1),  # a power of two: few shapes
              1 << max(num_steps - 1, 0).bit_length())
  hist = np.zeros((num_layers, num_experts + 1), np.int64)
  missed = np.zeros((num_layers, num_experts, caps.size), np.int64)
  hits = []
  with jax.enable_x64(True):  # uint64 words, only inside this pass
    above = _cold_state(num_layers, num_experts)
    for start in range(0, num_steps, chunk):
      part = needed[start:start + chunk]
      real = part.shape[0]
      if real < chunk:  # pad with empty steps, which change nothing counted
        part = np.pad(part, ((0, chunk - real), (0, 0), (0, 0)),
                      constant_values=empty)
      part_hist, part_hits, above, part_missed = _scan(
          jnp.asarray(part), above, jnp.asarray(caps), num_experts,
          histogram, per_expert)
      hist += np.asarray(part_hist)
      missed += np.asarray(part_missed)
      hits.append(np.asarray(part_hits)[:real])
  hits = (np.concatenate(hits) if hits else
          np.zeros((0, num_layers, caps.size), np.int32))
  if per_expert:
    return hist[:, :num_experts], hits, missed
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
  num_steps, num_layers, num_experts = masks.shape
  hist, _ = lru_scan(words_of_masks(masks), num_experts)
  references = masks.sum(axis=(0, 2)).astype(np.int64)
  cold = references - hist.sum(axis=1)
  hits = np.concatenate([np.zeros((num_layers, 1), np.int64),
                         np.cumsum(hist, axis=1)], axis=1)
  return MissRatioCurve(references=references, cold=cold,
                        distance_histogram=hist, hits=hits,
                        num_steps=num_steps)


def expert_misses(trace_or_masks: RoutingTrace | np.ndarray,
                  capacity: int) -> np.ndarray:
  """`[L, E]` int64 misses of each expert in a capacity-`capacity` LRU
  cache per layer (the module docstring's model): which experts a cache of
  that size keeps missing, e.g. to plan a compressed device tier
  (`paging.bank.tier_from_counts`)."""
  masks = _masks(trace_or_masks)
  if not 0 <= capacity <= masks.shape[2]:
    raise ValueError(f"capacity must lie in [0, E={masks.shape[2]}], got "
                     f"{capacity}.")
  _, _, missed = lru_scan(words_of_masks(masks), masks.shape[2], [capacity],
                          histogram=False, per_expert=True)
  return missed[:, :, 0]


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
