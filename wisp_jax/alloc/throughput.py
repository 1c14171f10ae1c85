"""Predicted serving throughput of a split of device memory (the simulator).

Device memory = dense weights + workspace + expert slots + KV blocks. The
*pageable* bytes (budget - dense - workspace) are split between
`slots_per_layer[l]` experts per layer and `kv_blocks` KV blocks.

Steady state with n requests running (n <= C, n x held_blocks <= kv_blocks;
the engine runs the n that maximises throughput, i.e. its max batch is
configured), one decode *cycle* (one token for each running request) takes

  cycle(n) = t_dec(n) + (n / o) t_pre + r(n) t_rec

  t_dec(n) = step_cost(decode, batch n, misses=0)   # compute/HBM, overhead
             + tau sum_l M_l^n(c_l)                 # LRU misses of layer l
  t_pre    = mean over prompts p of step_cost(prefill of p, misses=0)
             + tau u(p) sum_l (1 - c_l / E)         # prompt's experts
  t_rec    = the same prefill cost for the mean decode context
  r(n)     = P_full(n) n / (BS held_blocks)         # preemptions per step
  P_full   = P(n requests hold more than kv_blocks),
             normal approx.: mean n held, std sqrt(n) held_std

where tau = expert bytes / host-to-device bandwidth (cost.step_cost's
transfer term, which is additive: transfers are not overlapped), M_l^n the
workload's LRU misses per step at concurrency n, o the mean output length
(n / o requests finish and are prefilled per step: Little's law), u(p) the
expected distinct experts of p tokens per layer. Prefill streams the experts
its slots do not hold and does not evict the decode working set (a cache
hit rate of c / E for the prompt's experts). A preempted request is
recomputed with one prefill of its context.

Throughput = n / cycle(n) output tokens per second; `J = cycle / n` is the
time per output token, the currency of the marginal values.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Sequence

import numpy as np

from wisp_jax.alloc.curves import union_size
from wisp_jax.alloc.split import BudgetError, Split
from wisp_jax.alloc.workload import Workload
from wisp_jax.paging.pager import check_capacity
from wisp_jax.sim import cost


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
    used = split.total_slots * w.expert_bytes + split.kv_blocks * w.block_bytes
    if used > self.pageable_bytes(w):
      raise BudgetError(
          f"split needs {used} bytes (slots {split.total_slots} x "
          f"{w.expert_bytes} + KV {split.kv_blocks} x {w.block_bytes}) but "
          f"only {self.pageable_bytes(w)} are pageable (total "
          f"{self.total_bytes} - dense {w.dense_bytes} - workspace "
          f"{self.workspace_bytes}).")


@dataclasses.dataclass(frozen=True)
class Tables:
  """Per-workload constants of the simulator (see the module docstring).

  Attributes:
    tau: seconds to page in one expert.
    n: `[C]` concurrencies 1..C.
    base_decode: `[C]` decode step seconds without transfers.
    misses: `[C, L, E + 1]` LRU misses per step at each n and capacity.
    base_prefill: mean prefill seconds without transfers.
    prefill_union: mean distinct experts per layer of a prompt.
    base_recompute: prefill seconds of the mean decode context.
    recompute_union: distinct experts per layer of that context.
  """
  tau: float
  n: np.ndarray
  base_decode: np.ndarray
  misses: np.ndarray
  base_prefill: float
  prefill_union: float
  base_recompute: float
  recompute_union: float


_TABLES: "weakref.WeakKeyDictionary[Workload, Tables]" = (
    weakref.WeakKeyDictionary())


def tables(workload: Workload) -> Tables:
  """The simulator's constants for `workload` (computed once, cached)."""
  if workload in _TABLES:
    return _TABLES[workload]
  w, m = workload, workload.model
  hw, bpp = w.hardware, w.bytes_per_param
  n = np.arange(1, w.concurrency + 1)
  misses, refs = w.curves.at(n)
  ctx = int(round(w.mean_context))

  def base(batch, context, phase, needed):
    return cost.step_cost(
        m, hw, batch=int(batch), context_len=int(context), mode="paged",
        phase=phase, misses=0, needed_experts=int(min(
            round(needed), m.num_layers * m.num_experts)),
        bytes_per_param=bpp, kv_bytes_per_value=w.kv_width).total_s

  base_decode = np.array([base(b, ctx, "decode", r.sum())
                          for b, r in zip(n, refs)])
  prompts, counts = np.unique(w.prompt_lens, return_counts=True)
  unions = union_size(m.num_experts, m.top_k, prompts)
  base_prefill = float(np.average(
      [base(1, p, "prefill", m.num_layers * u)
       for p, u in zip(prompts, unions)], weights=counts))
  rec_union = float(union_size(m.num_experts, m.top_k, ctx))
  out = Tables(
      tau=w.expert_bytes / hw.h2d_bytes_per_s, n=n,
      base_decode=base_decode, misses=misses, base_prefill=base_prefill,
      prefill_union=float(np.average(unions, weights=counts)),
      base_recompute=base(1, max(ctx, 1), "prefill",
                          m.num_layers * rec_union),
      recompute_union=rec_union)
  _TABLES[workload] = out
  return out


def full_probability(workload: Workload, n: np.ndarray, kv_blocks: float
                     ) -> np.ndarray:
  """P(n running requests need more than kv_blocks).

  Normal approximation of the sum of n requests' blocks (mean n held, std
  sqrt(n) held_std); exactly 0 when n longest requests fit.
  """
  n = np.asarray(n, np.float64)
  mean = n * workload.held_blocks
  std = np.sqrt(n) * workload.held_blocks_std
  slack = kv_blocks - mean
  with np.errstate(divide="ignore", invalid="ignore"):
    z = np.where(std > 0, slack / np.maximum(std, 1e-12),
                 np.where(slack >= 0, np.inf, -np.inf))
  prob = 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(
      z / math.sqrt(2.0))
  # n requests of the longest length always fit: no overflow at all.
  longest = -(-workload.max_len // workload.block_size)
  return np.where(kv_blocks >= n * longest, 0.0, prob)


def cycle_seconds(workload: Workload, n: np.ndarray, kv_blocks: np.ndarray,
                  decode_misses: np.ndarray, total_slots: np.ndarray
                  ) -> np.ndarray:
  """Seconds of one decode cycle (one token per running request).

  Args broadcast against each other:
    n: running requests (ints in 1..C).
    kv_blocks: KV pool size.
    decode_misses: LRU misses per decode step, summed over layers, at n.
    total_slots: slots summed over layers.

  Returns:
    cycle(n) of the module docstring; +inf where n x held > kv_blocks.
  """
  w, t = workload, tables(workload)
  n = np.asarray(n)
  kv = np.asarray(kv_blocks, np.float64)
  uncached = w.model.num_layers - np.asarray(total_slots) / (
      w.model.num_experts)
  t_dec = t.base_decode[n - 1] + t.tau * decode_misses
  t_pre = t.base_prefill + t.tau * t.prefill_union * uncached
  t_rec = t.base_recompute + t.tau * t.recompute_union * uncached
  preempt = full_probability(w, n, kv) * n / (w.block_size * w.held_blocks)
  cycle = t_dec + n / w.mean_output * t_pre + preempt * t_rec
  return np.where(n * w.held_blocks <= kv + 1e-9, cycle, np.inf)


def decode_misses(workload: Workload, slots_per_layer: Sequence[int]
                  ) -> np.ndarray:
  """`[C]` LRU misses per decode step, summed over layers, at n = 1..C."""
  t = tables(workload)
  caps = np.asarray(slots_per_layer, np.int64)
  return t.misses[:, np.arange(caps.size), caps].sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The simulator's view of one split.

  Attributes:
    tokens_per_s: output tokens per second.
    concurrency: running requests n the engine settles on.
    seconds_per_token: cycle(n) / n.
    decode_step_s: t_dec(n).
    decode_misses_per_step: experts paged per decode step.
    full_probability: P_full at n.
    kv_limited_concurrency: the most requests the KV pool admits (<= C).
  """
  tokens_per_s: float
  concurrency: int
  seconds_per_token: float
  decode_step_s: float
  decode_misses_per_step: float
  full_probability: float
  kv_limited_concurrency: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def per_token_seconds(workload: Workload, slots_per_layer: Sequence[int],
                      kv_blocks: float) -> tuple[float, int]:
  """min over n of cycle(n) / n, and the best n."""
  t = tables(workload)
  misses = decode_misses(workload, slots_per_layer)
  per_token = cycle_seconds(workload, t.n, kv_blocks, misses,
                            int(np.sum(slots_per_layer))) / t.n
  best = int(np.argmin(per_token))
  return float(per_token[best]), best + 1


def prediction(workload: Workload, split: Split) -> Prediction:
  """Detailed prediction for `split` (no budget check; see Budget)."""
  t = tables(workload)
  if split.kv_blocks < workload.held_blocks:
    raise BudgetError(f"kv_blocks={split.kv_blocks} cannot hold one request"
                      f" (mean {workload.held_blocks:.1f} blocks).")
  per_token, n = per_token_seconds(workload, split.slots_per_layer,
                                   split.kv_blocks)
  misses = decode_misses(workload, split.slots_per_layer)[n - 1]
  return Prediction(
      tokens_per_s=1.0 / per_token, concurrency=n,
      seconds_per_token=per_token,
      decode_step_s=float(t.base_decode[n - 1] + t.tau * misses),
      decode_misses_per_step=float(misses),
      full_probability=float(full_probability(workload, n,
                                              split.kv_blocks)),
      kv_limited_concurrency=int(min(workload.concurrency, split.kv_blocks
                                     // workload.held_blocks)))


def predict(workload: Workload, split: Split) -> float:
  """Predicted output tokens per second of `split` on `workload`."""
  return prediction(workload, split).tokens_per_s
