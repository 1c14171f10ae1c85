"""Steady-state expert traffic of the engine's pass order, every capacity.

The engine runs, per step, one prefill pass per admitted request and then
one decode pass over the running batch; one LRU cache per layer serves
every pass (the pager's tick moves once per pass). `engine_curves`
replays that order on routing taken from a trace:

  * n lanes (the batch); each lane serves requests back to back, a
    request of prompt p and output o holding it for o - 1 decode passes
    and starting with one prefill pass (lengths: the workload's samples);
  * the length samples are taken in rounds, each a random permutation
    (all used once per round, shared by the lanes);
  * a request's routing is that of a trace request (`RequestRouting`)
    with at least o - 1 decode tokens: its first o - 1 decode tokens and
    its prompt's union of experts (the trace's prefill events; without
    them, the union of its first p tokens). Among those long enough, one
    that no other lane runs (two lanes on one routing would share their
    experts), the least used so far. Only when no trace request is that
    long are the longest one's tokens continued into the next trace
    request's, with no prefill between (which breaks the reuse within a
    request that LRU hits on);
  * lanes start at random points of their first request, and a warm-up
    is not counted; the caches start with every expert in id order below
    anything referenced, so nothing is cold: the counts are those of a
    cache that has run forever (steady state);
  * recompute probes (`engine_stream(probes=True)`): the prefill that
    re-admits a preempted request (its prompt and its output so far),
    counted against the caches as they are had the request left the
    batch a wait before, and not applied.

`lru_pass_counts` is Mattson's one pass (`sim.mrc`'s reference model) over
the passes, counting every capacity at once, plus the pager's overflow
reloads: when a pass needs |U| > c experts, the pager keeps the c
lowest-id experts of U (the final group); if those c were all resident
already its early groups evict them and they are loaded again, min(c,
|U| - c) extra loads (`paging.pager.page_layer`; tested against the
planner's replay). Loads = misses + those reloads.

From one stream with prefill passes and one with the decode passes alone
(the same tokens), per level n: decode misses/loads per decode pass
without prefills, the decode misses/loads each prefill pass adds by
evicting the decode working set, the misses/loads of a new request's
prefill pass, and those of a recompute prefill.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import numpy as np

from wisp_jax.traces.trace import PREFILL, RoutingTrace

DECODE_PASS, PREFILL_PASS, RECOMPUTE_PROBE = 0, 1, 2
# Not counted: a recompute probe's view of the caches (`engine_stream`).
SHADOW_START, SHADOW_PASS = 3, 4
# Recompute probes of a level's stream are this many probe windows
# (`engine_stream`) apart: each window doubles the passes in it.
PROBE_SPACING = 3

# Requests a level's stream serves by default. A stream's counts vary
# with the requests it draws, about as one over the root of their number;
# a fixed count of steps leaves low levels (few lanes) the noisiest.
LEVEL_REQUESTS = 500


@dataclasses.dataclass(frozen=True, eq=False)
class RequestRouting:
  """Per-request routing of a trace, for building engine-order streams.

  Attributes:
    tokens: `[N, L, K]` decode tokens of every request, request after
      request.
    starts: `[R]` offset of each request's first decode token.
    lengths: `[R]` decode tokens of each request.
    prompts: `[R, L, E]` bool union of each request's prefill experts, or
      None when the trace has no prefill events.
    num_experts: E.
    first_use: `[R, L, E]` tokens from each request's start (cyclically
      through the requests that follow) to the first use of each expert;
      the union of a request's first p tokens is `first_use < p`.
  """
  tokens: np.ndarray
  starts: np.ndarray
  lengths: np.ndarray
  prompts: np.ndarray | None
  num_experts: int
  first_use: np.ndarray

  @property
  def num_requests(self) -> int:
    return int(self.starts.size)

  @classmethod
  def from_trace(cls, trace: RoutingTrace) -> "RequestRouting":
    """Groups a trace's events by request (decode tokens by position)."""
    decode = trace.phase != PREFILL
    if not decode.any():
      raise ValueError(f"trace {trace.source!r} has no decode events.")
    ids = trace.ids.astype(np.int64)
    requests = np.unique(trace.request[decode])
    order = np.lexsort((trace.position[decode], trace.request[decode]))
    tokens = ids[decode][order]
    req = trace.request[decode][order]
    starts = np.searchsorted(req, requests)
    lengths = np.diff(np.r_[starts, req.size])
    num_layers, num_experts = trace.num_layers, trace.num_experts
    prompts = None
    prefill = ~decode
    if prefill.any():
      prompts = np.zeros((requests.size, num_layers, num_experts), bool)
      rows = np.searchsorted(requests, trace.request[prefill])
      known = (rows < requests.size) & (
          requests[np.minimum(rows, requests.size - 1)] ==
          trace.request[prefill])
      layer = np.arange(num_layers)[None, :, None]
      prompts[rows[known][:, None, None], layer, ids[prefill][known]] = True
    # First use of (l, e) at or after each request's start, cyclically.
    total = tokens.shape[0]
    first = np.full((requests.size, num_layers, num_experts), total,
                    np.int64)
    hit = np.zeros((total, num_layers, num_experts), bool)
    hit[np.arange(total)[:, None, None], np.arange(num_layers)[None, :, None],
        tokens] = True
    for l in range(num_layers):
      for e in range(num_experts):
        where = np.flatnonzero(hit[:, l, e])
        if where.size == 0:
          continue
        cyc = np.r_[where, where + total]
        nxt = cyc[np.searchsorted(cyc, starts)]
        first[:, l, e] = nxt - starts
    return cls(tokens=tokens, starts=starts, lengths=lengths,
               prompts=prompts, num_experts=num_experts, first_use=first)

  def prompt_mask(self, request: int, prompt_len: int) -> np.ndarray:
    """`[L, E]` experts of the prompt of trace request `request`."""
    if self.prompts is not None:
      return self.prompts[request]
    return self.first_use[request] < max(int(prompt_len), 1)


def engine_stream(routing: RequestRouting, prompt_lens, output_lens,
                  lanes: int, steps: int, warmup: int, seed: int = 0,
                  prefills: bool = True, probes: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The engine's passes for `lanes` running requests.

  With `probes`, a RECOMPUTE_PROBE every `PROBE_SPACING` (`wait` + 1)
  measured steps: the prefill that re-admits a preempted request. The
  scheduler preempts the most recently admitted request and re-admits it
  once a finished one frees blocks, about `wait` = (mean output - 1) /
  lanes steps later (the time between two ends). So the probe at step t,
  before that step's passes, needs the prompt's experts and those of the
  decode tokens up to step t - `wait` of the request the newest lane ran
  then, and sees the caches as they would be had that request left the
  batch at t - `wait`: SHADOW_START and SHADOW_PASS passes, one before
  each pass of those steps, carry the same masks less the victim's
  decode tokens. Probes and shadow passes are not applied: the other
  passes' counts do not depend on them (`lru_pass_counts`).

  Returns:
    masks `[P, L, E]` bool needed experts of each pass, kinds `[P]`
    (DECODE_PASS, PREFILL_PASS, RECOMPUTE_PROBE, SHADOW_START or
    SHADOW_PASS) and measured `[P]` bool (False during the first `warmup`
    steps).
  """
  rng = np.random.default_rng(seed)
  p_all = np.asarray(prompt_lens, np.int64)
  o_all = np.asarray(output_lens, np.int64)
  if p_all.size == 0 or p_all.size != o_all.size:
    raise ValueError(f"need as many prompt as output lengths, at least one "
                     f"(got {p_all.size} and {o_all.size}).")
  if o_all.max() < 2:
    raise ValueError("every output length is below 2: a request then has "
                     "no decode pass, and the stream none.")
  total_steps = warmup + steps
  num_tokens, num_layers, _ = routing.tokens.shape
  token_at = np.zeros((lanes, total_steps), np.int64)
  # Each lane's request, its prompt length and the step it started.
  request_at = np.zeros((lanes, total_steps), np.int64)
  prompt_at = np.zeros((lanes, total_steps), np.int64)
  started_at = np.zeros((lanes, total_steps), np.int64)
  starts: list[list[tuple[int, int, int]]] = [[] for _ in range(total_steps)]
  samples = _cycled_permutations(rng, p_all.size)
  uses = np.zeros(routing.num_requests, np.int64)
  # Lanes admit in time order (a lane frees at the end of its request),
  # so a lane picks knowing what the others run: `holder` until `ends`.
  holder = np.zeros(lanes, np.int64)
  ends = np.zeros(lanes, np.int64)
  free = [(0, lane) for lane in range(lanes)]
  first = np.ones(lanes, bool)
  while free:
    t, lane = heapq.heappop(free)
    i = next(samples)
    length = int(o_all[i]) - 1
    busy = holder[ends > t]
    r = _pick_request(routing.lengths, uses, busy, length, rng)
    uses[r] += 1
    if prefills and not first[lane]:
      starts[t].append((lane, r, int(p_all[i])))
    if length < 1:  # ends at its prefill; the lane admits another
      heapq.heappush(free, (t, lane))
      continue
    skip = int(rng.integers(length)) if first[lane] else 0
    first[lane] = False
    take = min(length - skip, total_steps - t)
    token_at[lane, t:t + take] = (routing.starts[r] + skip +
                                  np.arange(take)) % num_tokens
    request_at[lane, t:t + take] = r
    prompt_at[lane, t:t + take] = p_all[i]
    started_at[lane, t:t + take] = t - skip
    holder[lane], ends[lane] = r, t + take
    if t + take < total_steps:
      heapq.heappush(free, (t + take, lane))
  layer = np.arange(num_layers)[None, None, :, None]
  decode = np.zeros((total_steps, num_layers, routing.num_experts), bool)
  ids = routing.tokens[token_at]  # [lanes, S, L, K]
  decode[np.arange(total_steps)[None, :, None, None], layer, ids] = True
  wait = max(1, int(round(float(np.maximum(o_all - 1, 1).mean()) / lanes)))
  every = PROBE_SPACING * (wait + 1) if probes else 0
  layers = np.arange(num_layers)[None, :, None]
  # Probe step -> its mask; each step of a probe's window -> the victim's
  # lane (-1 once the victim's request has ended).
  probe_masks, window = {}, {}
  if every:
    for t in range(warmup + wait, total_steps, every):
      s = t - wait
      lane = int(np.argmax(started_at[:, s]))
      r = int(request_at[lane, s])
      # Its context then: the prompt and the decode inputs up to step s's.
      done = (token_at[lane, s] - routing.starts[r]) % num_tokens + 1
      mask = routing.prompt_mask(r, int(prompt_at[lane, s])).copy()
      mask[layers, routing.tokens[(routing.starts[r] + np.arange(done)) %
                                  num_tokens]] = True
      probe_masks[t] = mask
      for u in range(s, t):
        window[u] = lane if request_at[lane, u] == r else -1
  masks, kinds, measured = [], [], []
  shadow = SHADOW_START
  for t in range(total_steps):
    if t in probe_masks:
      masks.append(probe_masks[t])
      kinds.append(RECOMPUTE_PROBE)
      measured.append(True)
      shadow = SHADOW_START
    passes = [(routing.prompt_mask(r, p), PREFILL_PASS)
              for _, r, p in starts[t]] + [(decode[t], DECODE_PASS)]
    lane = window.get(t)
    without = decode[t]
    if lane is not None and lane >= 0:
      without = np.zeros_like(decode[t])
      without[layers, routing.tokens[token_at[np.delete(
          np.arange(lanes), lane), t]]] = True
    for mask, kind in passes:
      if lane is not None:
        masks.append(without if kind == DECODE_PASS else mask)
        kinds.append(shadow)
        measured.append(False)
        shadow = SHADOW_PASS
      masks.append(mask)
      kinds.append(kind)
      measured.append(t >= warmup)
  return np.stack(masks), np.asarray(kinds), np.asarray(measured)


def _pick_request(lengths: np.ndarray, uses: np.ndarray, busy: np.ndarray,
                  length: int, rng: np.random.Generator) -> int:
  """A trace request for a request of `length` decode tokens: among those
  at least that long (else the longest), one no other lane runs when
  possible, the least used so far, ties at random."""
  long_enough = lengths >= max(length, 1)
  if not long_enough.any():
    long_enough = lengths == lengths.max()
  idle = long_enough.copy()
  idle[busy] = False
  pool = np.flatnonzero(idle if idle.any() else long_enough)
  pool = pool[uses[pool] == uses[pool].min()]
  return int(pool[rng.integers(pool.size)])


def _cycled_permutations(rng: np.random.Generator, size: int):
  """Indices 0..size-1, a fresh random permutation after each full pass
  (every length sample used once per pass: less noise than draws with
  replacement)."""
  while True:
    yield from (int(i) for i in rng.permutation(size))


@dataclasses.dataclass(frozen=True)
class PassCounts:
  """LRU counts of one kind of pass, every capacity.

  Attributes:
    passes: passes counted.
    references: `[L]` experts needed, summed over passes.
    misses: `[L, E + 1]` misses at capacity c (index c).
    loads: `[L, E + 1]` copies at capacity c (misses + overflow reloads).
    expert_misses: `[L, E, E + 1]` misses of each expert at capacity c
      (summing over experts gives `misses`), or None when not asked for.
  """
  passes: int
  references: np.ndarray
  misses: np.ndarray
  loads: np.ndarray
  expert_misses: np.ndarray | None = None


def lru_pass_counts(masks: np.ndarray, kinds: np.ndarray,
                    measured: np.ndarray, num_kinds: int = 2,
                    per_expert: bool = False) -> list[PassCounts]:
  """Mattson's pass over `masks` `[P, L, E]`, counts per kind of pass
  (with `per_expert`, also each expert's misses at every capacity). A
  RECOMPUTE_PROBE pass is counted on the stacks of the shadow passes
  before it (SHADOW_START copies the stacks, SHADOW_PASS moves the copy;
  neither is counted; without any, on the stacks themselves) and leaves
  the stacks as they were."""
  num_passes, num_layers, num_experts = masks.shape
  width = num_experts + 1
  if per_expert:
    # Expert e of layer l at stack position p: ((l E + e) width + p).
    cell = (np.arange(num_layers * num_experts) * width).reshape(
        num_layers, num_experts)
    ehist = np.zeros((num_kinds, num_layers * num_experts * width))
  tie = num_experts - 1 - np.arange(num_experts)
  last = np.full((num_layers, num_experts), -1, np.int64)
  flat = np.arange(num_layers)[:, None] * width
  hist = np.zeros((num_kinds, num_layers * width))
  extra = np.zeros((num_kinds, num_layers * width))
  refs = np.zeros((num_kinds, num_layers))
  count = np.zeros(num_kinds, np.int64)
  position = np.empty((num_layers, num_experts), np.int64)
  ranks = np.broadcast_to(np.arange(num_experts), (num_layers, num_experts))
  shadow = None
  for i in range(num_passes):
    need = masks[i]
    if kinds[i] in (SHADOW_START, SHADOW_PASS):
      if kinds[i] == SHADOW_START:
        shadow = last.copy()
      elif shadow is None:
        raise ValueError(f"pass {i} is a SHADOW_PASS before any "
                         "SHADOW_START.")
      shadow[need] = i
      continue
    if measured[i]:
      kind = kinds[i]
      view = (shadow if kind == RECOMPUTE_PROBE and shadow is not None
              else last)
      key = view * num_experts + tie
      np.put_along_axis(position, np.argsort(-key, axis=1), ranks, axis=1)
      hist[kind] += np.bincount((flat + position)[need],
                                minlength=num_layers * width)
      if per_expert:
        ehist[kind] += np.bincount((cell + position)[need],
                                   minlength=ehist.shape[1])
      size = need.sum(axis=1)
      refs[kind] += size
      # Overflow: the c lowest-id needed experts all resident -> reloads.
      worst = np.maximum.accumulate(np.where(need, position, -1), axis=1)
      rank = np.cumsum(need, axis=1)
      reload = need & (worst < rank) & (rank < size[:, None])
      if reload.any():
        extra[kind] += np.bincount(
            (flat + rank)[reload], minlength=num_layers * width,
            weights=np.minimum(rank, size[:, None] - rank)[reload])
      count[kind] += 1
    if kinds[i] != RECOMPUTE_PROBE:
      last[need] = i
  out = []
  for kind in range(num_kinds):
    h = hist[kind].reshape(num_layers, width)
    hits = np.concatenate([np.zeros((num_layers, 1)),
                           np.cumsum(h[:, :-1], axis=1)], axis=1)
    misses = refs[kind][:, None] - hits
    by_expert = None
    if per_expert:
      eh = ehist[kind].reshape(num_layers, num_experts, width)
      # A reference at position p hits at every capacity above p.
      by_expert = eh.sum(axis=2, keepdims=True) - np.concatenate(
          [np.zeros((num_layers, num_experts, 1)),
           np.cumsum(eh[..., :-1], axis=2)], axis=2)
    out.append(PassCounts(passes=int(count[kind]), references=refs[kind],
                          misses=misses, loads=misses + extra[kind].reshape(
                              num_layers, width), expert_misses=by_expert))
  return out


def level_stream(routing: RequestRouting, prompt_lens, output_lens,
                 level: int, steps: int | None = None,
                 warmup: int | None = None, seed: int = 0,
                 probes: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`engine_stream` of one level as `engine_curves` measures it: `steps`
  decode steps (default: enough for `LEVEL_REQUESTS` requests to start,
  and at least 6 mean lifetimes and 400 steps) after `warmup` (default
  one mean lifetime, at least 32), lanes seeded by the level (with
  recompute `probes` or not)."""
  o = np.asarray(output_lens, np.int64)
  life = float(np.maximum(o - 1, 1).mean())
  steps = int(steps or max(400, 6 * life,
                           np.ceil(LEVEL_REQUESTS * life / int(level))))
  warmup = int(warmup if warmup is not None else max(32, life))
  return engine_stream(routing, prompt_lens, output_lens, int(level), steps,
                       warmup, seed + 1000 * int(level),
                       probes=probes)


@dataclasses.dataclass(frozen=True)
class EngineCurves:
  """Per-level steady-state traffic (levels n = `concurrency`).

  Per decode pass without prefills: `misses`, `loads` `[N, L, E + 1]`,
  `references` `[N, L]`. Per prefill pass: `prefill_misses`,
  `prefill_loads`, `prefill_references`, and the decode misses/loads it
  adds (`eviction_misses`, `eviction_loads`). Per recompute prefill (a
  preempted request re-admitted, `engine_stream`'s probes):
  `recompute_misses`, `recompute_loads`. `prefill_rate` `[N]`: prefill
  passes per decode pass in the measured stream.
  """
  concurrency: np.ndarray
  misses: np.ndarray
  loads: np.ndarray
  references: np.ndarray
  prefill_misses: np.ndarray
  prefill_loads: np.ndarray
  prefill_references: np.ndarray
  eviction_misses: np.ndarray
  eviction_loads: np.ndarray
  prefill_rate: np.ndarray
  recompute_misses: np.ndarray | None = None
  recompute_loads: np.ndarray | None = None


def engine_curves(routing: RequestRouting, prompt_lens, output_lens,
                  levels: Sequence[int], steps: int | None = None,
                  warmup: int | None = None, seed: int = 0) -> EngineCurves:
  """Steady-state traffic at each level (see the module docstring).

  Args:
    routing: per-request routing of a profiling trace.
    prompt_lens, output_lens: the workload's length samples.
    levels: batch sizes n to measure.
    steps: decode steps measured per level (default: `level_stream`'s).
    warmup: steps not measured (default one mean lifetime, at least 32).
    seed: lane schedules.
  """
  fields = {k: [] for k in ("misses", "loads", "references", "pm", "pl",
                            "pr", "em", "el", "rate", "rm", "rl")}
  for n in levels:
    masks, kinds, measured = level_stream(routing, prompt_lens, output_lens,
                                          n, steps, warmup, seed,
                                          probes=True)
    decode, prefill, probe = lru_pass_counts(masks, kinds, measured,
                                             num_kinds=3)
    alone = lru_pass_counts(masks[kinds == DECODE_PASS],
                            kinds[kinds == DECODE_PASS],
                            measured[kinds == DECODE_PASS])[DECODE_PASS]
    steps_n = max(alone.passes, 1)
    rate = prefill.passes / steps_n
    per = max(prefill.passes, 1)
    fields["misses"].append(alone.misses / steps_n)
    fields["loads"].append(alone.loads / steps_n)
    fields["references"].append(alone.references / steps_n)
    fields["pm"].append(prefill.misses / per)
    fields["pl"].append(prefill.loads / per)
    fields["pr"].append(prefill.references / per)
    # Decode traffic the prefill passes add, per prefill pass.
    fields["em"].append((decode.misses - alone.misses) / per)
    fields["el"].append((decode.loads - alone.loads) / per)
    fields["rate"].append(rate)
    fields["rm"].append(probe.misses / max(probe.passes, 1))
    fields["rl"].append(probe.loads / max(probe.passes, 1))
  s = lambda k: np.stack(fields[k])
  return EngineCurves(
      concurrency=np.asarray(levels, np.float64), misses=s("misses"),
      loads=s("loads"), references=s("references"), prefill_misses=s("pm"),
      prefill_loads=s("pl"), prefill_references=s("pr"),
      eviction_misses=s("em"), eviction_loads=s("el"),
      prefill_rate=np.asarray(fields["rate"]), recompute_misses=s("rm"),
      recompute_loads=s("rl"))
