"""The serving scheduler's KV dynamics, in steady state, without routing.

What the engine's scheduler (`serving.scheduler`) does with a KV pool of b
blocks and a max batch n, for a closed loop of C requests (a finished
request is replaced by a new one, drawn from the workload's length
samples): per engine step it

  1. admits waiting requests in order (a preempted request first) while
     fewer than n run and the pool has the blocks of the head's context
     and first decode token plus one block for every running request at a
     block boundary; each admission is one prefill pass that samples a
     token (a request whose last token that was finishes at once);
  2. gives every running request at a block boundary one more block, in
     admission order; when the pool is empty the most recently admitted
     request is preempted (its blocks freed, its tokens kept; it returns
     to the head of the queue and re-prefills its whole context when
     readmitted);
  3. decodes every running request once; finished requests free their
     blocks.

`simulate` replays these rules (not the engine's code: alloc sits below
serving) for many (n, b) at once, vectorised over configurations, and
returns per-step rates (`KVStats`). `unconstrained` gives the same rates
in closed form where b >= n x the longest request's blocks: then the
pool never binds, every step decodes n rows and each request holds its
lane for max(o - 1, 0) steps (renewal reward over the length samples).
`fluid` approximates the binding pool in closed form (the lanes a pool
holds next to the head's admission need), for online re-solves.

Step 2 equals the engine's sequential loop: with needers processed in
admission order and victims taken from the newest end, the requests that
survive are the longest admission-order prefix whose needers fit in the
free blocks plus the blocks of everything after it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FIELDS = ("batch", "decodes", "new_prefills", "recompute_prefills",
          "prefill_tokens", "prefill_seconds", "preemptions",
          "blocks_in_use", "context", "tokens")


@dataclasses.dataclass(frozen=True)
class KVStats:
  """Steady-state rates per engine step of configurations `[K]`.

  Attributes:
    max_batch: `[K]` int, n.
    kv_blocks: `[K]` float, b (inf: unbounded).
    batch: `[K]` mean rows of a decode pass.
    decodes: `[K]` decode passes per step (<= 1).
    new_prefills: `[K]` prefills of new requests per step.
    recompute_prefills: `[K]` prefills of preempted requests per step.
    prefill_tokens: `[K]` tokens prefilled per step.
    prefill_seconds: `[K]` sum of `prefill_cost[context]` per step (0
      without a cost table).
    preemptions: `[K]` per step.
    blocks_in_use: `[K]` mean blocks held at the end of a step.
    context: `[K]` mean key positions a decode row reads.
    tokens: `[K]` output tokens per step (decode rows + prefills).
  """
  max_batch: np.ndarray
  kv_blocks: np.ndarray
  batch: np.ndarray
  decodes: np.ndarray
  new_prefills: np.ndarray
  recompute_prefills: np.ndarray
  prefill_tokens: np.ndarray
  prefill_seconds: np.ndarray
  preemptions: np.ndarray
  blocks_in_use: np.ndarray
  context: np.ndarray
  tokens: np.ndarray

  @property
  def prefills(self) -> np.ndarray:
    return self.new_prefills + self.recompute_prefills

  def row(self, i: int) -> dict[str, float]:
    """Configuration i as a dict of floats."""
    return {name: float(getattr(self, name)[i]) for name in
            ("max_batch", "kv_blocks") + FIELDS}


def _check_lengths(prompt_lens, output_lens) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(prompt_lens, np.int64).ravel()
  o = np.asarray(output_lens, np.int64).ravel()
  if p.size == 0 or p.shape != o.shape or p.min() < 1 or o.min() < 1:
    raise ValueError("need paired, non-empty prompt/output lengths >= 1.")
  return p, o


def blocks_needed(prompt_lens, output_lens, block_size: int) -> np.ndarray:
  """`[R]` most blocks each request holds (the engine's last position is
  prompt + output - 1)."""
  p, o = _check_lengths(prompt_lens, output_lens)
  return -(-(p + o - 1) // block_size)


def unconstrained(prompt_lens, output_lens, block_size: int,
                  max_batch: np.ndarray | int,
                  prefill_cost: np.ndarray | None = None) -> KVStats:
  """Rates where the pool never binds (b >= n x the longest request).

  Every step decodes n rows; a request holds its lane for d = max(o - 1, 0)
  steps, so per step and lane the rates are E[reward] / E[d].
  """
  p, o = _check_lengths(prompt_lens, output_lens)
  n = np.atleast_1d(np.asarray(max_batch, np.float64))
  d = np.maximum(o - 1, 0).astype(np.float64)
  if d.sum() == 0:
    raise ValueError("every request ends at its prefill (output length 1): "
                     "there is no decode to model.")
  steps = d.mean()
  # Decode i = 1..d reads p + i positions; after it the request holds
  # ceil((p + i) / BS) blocks, except after its last decode (freed).
  context = (d * p + d * (d + 1) / 2).mean()
  # Summed over i = 1..d - 1: ceil((p + i) / BS) = S(p + d - 1) - S(p),
  # S(x) = sum_{j <= x} ceil(j / BS) = BS q (q + 1) / 2 + r (q + 1) for
  # x = q BS + r.
  def blocks_to(x):
    q, r = np.divmod(x, block_size)
    return block_size * q * (q + 1) // 2 + r * (q + 1)

  last = p + np.maximum(d.astype(np.int64) - 1, 0)
  held = (blocks_to(last) - blocks_to(p)).astype(np.float64)
  cost = (0.0 if prefill_cost is None else
          float(np.asarray(prefill_cost)[p].mean()))
  rate = n / steps  # requests started per step
  zeros = np.zeros_like(n)
  return KVStats(
      max_batch=n.astype(np.int64), kv_blocks=np.full_like(n, np.inf),
      batch=n.copy(), decodes=np.ones_like(n), new_prefills=rate,
      recompute_prefills=zeros, prefill_tokens=rate * p.mean(),
      prefill_seconds=rate * cost, preemptions=zeros.copy(),
      blocks_in_use=rate * held.mean(), context=np.full_like(n, context /
                                                             steps),
      tokens=rate * o.mean())


def fluid(prompt_lens, output_lens, block_size: int, max_batch, kv_blocks,
          prefill_cost: np.ndarray | None = None) -> KVStats:
  """Rates of (max_batch[k], kv_blocks[k]) in a fluid approximation.

  A running request holds h blocks on average (`unconstrained`'s blocks in
  use per lane) and the request at the head of the queue gathers a blocks
  (its mean admission need: its context and first decode token) before
  it is admitted, so a pool of b blocks runs m = clip((b - a) / h, 1, n)
  lanes, and every rate of `unconstrained` scales by m / n. No
  preemption: a closed-form stand-in for `simulate`, cheap enough to
  re-solve a split online (its error against `simulate` where the pool
  binds is in tests/alloc/kv_test.py). Equal to `unconstrained` where
  b >= a + n h.
  """
  p, o = _check_lengths(prompt_lens, output_lens)
  n, b = np.broadcast_arrays(np.atleast_1d(np.asarray(max_batch, np.int64)),
                             np.atleast_1d(np.asarray(kv_blocks,
                                                      np.float64)))
  if n.min() < 1:
    raise ValueError(f"max batches must be >= 1, got {n.min()}.")
  free = unconstrained(p, o, block_size, n, prefill_cost)
  per_lane = free.blocks_in_use / n
  admit = float(np.mean(-(-np.minimum(p + 1, p + o - 1) // block_size)))
  lanes = np.clip((b - admit) / np.maximum(per_lane, 1e-12), 1.0, n)
  scale = lanes / n
  return KVStats(
      max_batch=n.copy(), kv_blocks=b.copy(), batch=lanes,
      decodes=free.decodes, new_prefills=free.new_prefills * scale,
      recompute_prefills=free.recompute_prefills,
      prefill_tokens=free.prefill_tokens * scale,
      prefill_seconds=free.prefill_seconds * scale,
      preemptions=free.preemptions, blocks_in_use=lanes * per_lane,
      context=free.context, tokens=free.tokens * scale)


def simulate(prompt_lens, output_lens, block_size: int, population: int,
             max_batch, kv_blocks, steps: int | None = None,
             warmup: int | None = None, seed: int = 0,
             prefill_cost: np.ndarray | None = None) -> KVStats:
  """Steady-state rates of configurations (max_batch[k], kv_blocks[k]).

  Args:
    prompt_lens, output_lens: `[R]` paired length samples.
    block_size: positions per KV block.
    population: C, requests in the closed loop (>= every max batch).
    max_batch: `[K]` ints n.
    kv_blocks: `[K]` ints b, each >= the longest request's blocks.
    steps: measured steps (default 12 mean lifetimes, at least 600).
    warmup: steps run first and not measured (default 2 lifetimes).
    seed: draws the order in which requests arrive.
    prefill_cost: `[>= max context + 1]` seconds of a prefill by context
      length, summed into `prefill_seconds`.

  Returns:
    the rates (the module docstring has the rules).
  """
  p_all, o_all = _check_lengths(prompt_lens, output_lens)
  nb = np.atleast_1d(np.asarray(max_batch, np.int64))
  kv = np.atleast_1d(np.asarray(kv_blocks, np.int64))
  nb, kv = np.broadcast_arrays(nb, kv)
  nb, kv = nb.copy(), kv.copy()
  if nb.min() < 1 or nb.max() > population:
    raise ValueError(f"max batches {nb.min()}..{nb.max()} must lie in "
                     f"[1, population={population}].")
  longest = int(blocks_needed(p_all, o_all, block_size).max())
  if kv.min() < longest:
    raise ValueError(f"kv_blocks {kv.min()} cannot hold the longest request "
                     f"({longest} blocks).")
  life = float(np.maximum(o_all - 1, 1).mean())
  steps = int(steps or max(600, 12 * life))
  warmup = int(warmup if warmup is not None else max(100, 2 * life))
  cost = (np.zeros(int((p_all + o_all).max()) + 1) if prefill_cost is None
          else np.asarray(prefill_cost, np.float64))
  k_count, lanes, bs = nb.size, int(nb.max()), int(block_size)
  rng = np.random.default_rng(seed)
  order = rng.integers(0, p_all.size, size=max(4096, 8 * p_all.size))
  seq_p, seq_o = p_all[order], o_all[order]
  rows = np.arange(k_count)

  valid = np.zeros((k_count, lanes), bool)
  stamp = np.zeros((k_count, lanes), np.int64)
  plen = np.zeros((k_count, lanes), np.int64)
  olen = np.zeros((k_count, lanes), np.int64)
  gen = np.zeros((k_count, lanes), np.int64)
  kvlen = np.zeros((k_count, lanes), np.int64)
  held = np.zeros((k_count, lanes), np.int64)
  # Preempted requests, a stack per configuration (top: the next to admit).
  q_p = np.zeros((k_count, population), np.int64)
  q_o = np.zeros_like(q_p)
  q_g = np.zeros_like(q_p)
  q_n = np.zeros(k_count, np.int64)
  pointer = np.zeros(k_count, np.int64)
  free = kv.copy()
  next_stamp = np.ones(k_count, np.int64)
  totals = {name: np.zeros(k_count) for name in FIELDS}
  big = np.iinfo(np.int64).max

  for t in range(warmup + steps):
    measure = t >= warmup
    # 1. Admission, one request per configuration per round.
    for _ in range(population + 1):
      running = valid.sum(axis=1)
      stacked = q_n > 0
      waiting_new = population - running - q_n
      top = np.maximum(q_n - 1, 0)
      at = pointer % seq_p.size
      hp = np.where(stacked, q_p[rows, top], seq_p[at])
      ho = np.where(stacked, q_o[rows, top], seq_o[at])
      hg = np.where(stacked, q_g[rows, top], 0)
      context = hp + hg
      need = -(-np.minimum(context + 1, hp + ho - 1) // bs)
      reserved = (valid & (kvlen == held * bs)).sum(axis=1)
      ok = ((stacked | (waiting_new > 0)) & (running < nb) &
            (free >= need + reserved))
      if not ok.any():
        break
      ks = np.flatnonzero(ok)
      slot = np.argmin(valid[ks], axis=1)
      valid[ks, slot] = True
      stamp[ks, slot] = next_stamp[ks]
      next_stamp[ks] += 1
      plen[ks, slot], olen[ks, slot] = hp[ks], ho[ks]
      gen[ks, slot] = hg[ks] + 1
      kvlen[ks, slot], held[ks, slot] = context[ks], need[ks]
      free[ks] -= need[ks]
      again = stacked[ks]
      q_n[ks[again]] -= 1
      pointer[ks[~again]] += 1
      if measure:
        totals["new_prefills"][ks[~again]] += 1
        totals["recompute_prefills"][ks[again]] += 1
        totals["prefill_tokens"][ks] += context[ks]
        totals["prefill_seconds"][ks] += cost[context[ks]]
        totals["tokens"][ks] += 1
      done = gen[ks, slot] >= olen[ks, slot]
      if done.any():
        kd, sd = ks[done], slot[done]
        free[kd] += held[kd, sd]
        valid[kd, sd] = False
        held[kd, sd] = 0
    # 2. Blocks for the rows at a block boundary; preempt the newest.
    sort = np.argsort(np.where(valid, stamp, big), axis=1)
    v_s = np.take_along_axis(valid, sort, axis=1)
    h_s = np.take_along_axis(held, sort, axis=1)
    needs = v_s & (np.take_along_axis(kvlen, sort, axis=1) ==
                   h_s * bs)
    count = v_s.sum(axis=1)
    needers = np.concatenate([np.zeros((k_count, 1), np.int64),
                              np.cumsum(needs, axis=1)], axis=1)
    total_held = h_s.sum(axis=1, keepdims=True)
    after = total_held - np.concatenate(
        [np.zeros((k_count, 1), np.int64), np.cumsum(h_s, axis=1)], axis=1)
    fits = (needers <= free[:, None] + after) & (
        np.arange(lanes + 1)[None, :] <= count[:, None])
    keep = fits.sum(axis=1) - 1  # survivors: sorted positions < keep
    victims = count - keep
    if victims.any():
      for k in np.flatnonzero(victims):
        # Newest first onto the stack, so the oldest victim is on top.
        for pos in range(int(count[k]) - 1, int(keep[k]) - 1, -1):
          s = sort[k, pos]
          q_p[k, q_n[k]], q_o[k, q_n[k]], q_g[k, q_n[k]] = (
              plen[k, s], olen[k, s], gen[k, s])
          q_n[k] += 1
          free[k] += held[k, s]
          valid[k, s] = False
          held[k, s], kvlen[k, s] = 0, 0
      if measure:
        totals["preemptions"] += victims
    position = np.empty_like(sort)
    np.put_along_axis(position, sort, np.arange(lanes)[None, :], axis=1)
    grow = valid & (kvlen == held * bs) & (position < keep[:, None])
    held += grow
    free -= grow.sum(axis=1)
    # 3. Decode every running request once.
    batch = valid.sum(axis=1)
    if measure:
      totals["batch"] += batch
      totals["decodes"] += batch > 0
      totals["context"] += np.where(valid, kvlen + 1, 0).sum(axis=1)
      totals["tokens"] += batch
    kvlen += valid
    gen += valid
    done = valid & (gen >= olen)
    free += np.where(done, held, 0).sum(axis=1)
    held = np.where(done, 0, held)
    valid &= ~done
    if measure:
      totals["blocks_in_use"] += held.sum(axis=1)

  decodes = np.maximum(totals["decodes"], 1)
  rows_decoded = np.maximum(totals["batch"], 1)
  out = {name: totals[name] / steps for name in FIELDS}
  out["batch"] = totals["batch"] / decodes
  out["context"] = totals["context"] / rows_decoded
  return KVStats(max_batch=nb, kv_blocks=kv.astype(np.float64), **out)
