"""Expert sources behind the model's interface: static offload, transient
and paged (the resident reference lives in `wisp_jax.models.experts`).

Each source's carry counts, per layer and in experts: hits (needed and
already on device), misses (needed and not) and loads (experts copied host
-> device, the traffic). Bytes = loads x `bytes_per_expert` on the host, so
int32 counters never overflow on real models.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wisp_jax.models import moe
from wisp_jax.models.experts import ExpertSource, SourceSpec
from wisp_jax.paging import pager
from wisp_jax.paging.policies import get_policy

SOURCES = ("resident", "static_offload", "transient", "paged")


@struct.dataclass
class Traffic:
  """Counters of the non-paged sources; fields as in `PagerState`.

  Attributes:
    hits: `[L]` int32.
    misses: `[L]` int32.
    loads: `[L]` int32.
    tick: `[]` int32 forward passes.
  """
  hits: jax.Array
  misses: jax.Array
  loads: jax.Array
  tick: jax.Array

  @classmethod
  def zeros(cls, num_layers: int) -> "Traffic":
    z = np.zeros((num_layers,), np.int32)
    return cls(*(jax.device_put(a) for a in (z, z.copy(), z.copy(),
                                             np.zeros((), np.int32))))


def _to_device(x):
  return jax.device_put(x, jax.memory.Space.Device)


def copy_experts(bank: moe.ExpertWeights, slots: moe.ExpertWeights, layer,
                 experts, dest, count) -> moe.ExpertWeights:
  """Copies `count` experts of `layer` from the host bank into device rows.

  Args:
    bank: `[L, E, ...]` host bank.
    slots: `[L, S, ...]` or `[R, ...]` device buffer.
    layer: layer index.
    experts: `[M]` int32 expert ids (first `count` valid).
    dest: `[M]` int32 destination rows.
    count: `[]` int32.
  """
  per_layer = slots.gate.ndim == bank.gate.ndim

  def body(i, slots):
    def put(dst, src):
      piece = jax.lax.dynamic_slice(src, (layer, experts[i], 0, 0),
                                    (1, 1) + src.shape[2:])
      piece = _to_device(piece)
      if per_layer:
        return jax.lax.dynamic_update_slice(dst, piece, (layer, dest[i], 0, 0))
      return jax.lax.dynamic_update_slice(dst, piece[0], (dest[i], 0, 0))
    return jax.tree.map(put, slots, bank)

  return jax.lax.fori_loop(0, count, body, slots)


def _count(traffic, layer, needed, hits, loads):
  num_needed = jnp.sum(needed, dtype=jnp.int32)
  return traffic.replace(hits=traffic.hits.at[layer].add(hits),
                         misses=traffic.misses.at[layer].add(num_needed - hits),
                         loads=traffic.loads.at[layer].add(loads))


def _gather_transient(bank, layer, wanted, max_rows: int):
  """Loads the `wanted` experts `[E]` (at most `max_rows`) into a scratch
  table.

  Returns:
    the scratch table `[R, ...]` (R = min(E, max_rows)), the row of each
    expert `[E]` int32 (valid where wanted) and the number loaded.
  """
  num_experts = wanted.shape[0]
  rows = min(num_experts, max_rows)
  count = jnp.sum(wanted, dtype=jnp.int32)
  experts = pager.compact(wanted, rows, num_experts)
  scratch = jax.tree.map(
      lambda w: jnp.zeros((rows,) + w.shape[2:], w.dtype), bank)
  scratch = copy_experts(bank, scratch, layer, experts,
                         jnp.arange(rows, dtype=jnp.int32), count)
  row = jnp.clip(jnp.cumsum(wanted) - 1, 0, rows - 1).astype(jnp.int32)
  return scratch, row, count


class CountingResidentSource(ExpertSource):
  """All experts on device (the reference), counting every need as a hit."""

  def __init__(self, experts):
    self.experts = experts

  def __call__(self, layer, x, ids, traffic):
    needed = pager.needed_mask(ids, self.experts.gate.shape[1])
    out = moe.expert_ffn(x, self.experts.layer(layer), ids)
    return out, _count(traffic, layer, needed,
                       jnp.sum(needed, dtype=jnp.int32), 0)


class StaticOffloadSource(ExpertSource):
  """Layer offload: all E experts of a layer are copied on every pass."""

  def __init__(self, bank):
    self.bank = bank

  def __call__(self, layer, x, ids, traffic):
    num_experts = self.bank.gate.shape[1]
    table = jax.tree.map(
        lambda w: _to_device(jax.lax.dynamic_slice(
            w, (layer, 0, 0, 0), (1,) + w.shape[1:]))[0], self.bank)
    out = moe.expert_ffn(x, table, ids)
    needed = pager.needed_mask(ids, num_experts)
    return out, _count(traffic, layer, needed, 0, num_experts)


class TransientSource(ExpertSource):
  """Use-then-evict: only the needed experts are copied, nothing is kept."""

  def __init__(self, bank):
    self.bank = bank

  def __call__(self, layer, x, ids, traffic):
    needed = pager.needed_mask(ids, self.bank.gate.shape[1])
    scratch, row, loads = _gather_transient(self.bank, layer, needed,
                                            ids.size)
    out = moe.expert_ffn(x, scratch, row[ids])
    return out, _count(traffic, layer, needed, 0, loads)


class PagedSource(ExpertSource):
  """The working-set pager: a slot cache per layer fed from the host bank.

  Carry: `(slots, PagerState)`, slots `[L, S, ...]` on device.
  """

  def __init__(self, bank, policy):
    self.bank = bank
    self.policy = policy

  def __call__(self, layer, x, ids, carry):
    slots, state = carry
    num_layers, num_experts = self.bank.gate.shape[:2]
    needed = pager.needed_mask(ids, num_experts)
    ls = pager.layer_state(state, layer)
    if self.policy.evicts:
      bank = self.bank
      out = jnp.zeros(ids.shape + (x.shape[1],), x.dtype)

      def on_chunk(data, plan):
        slots, out = data
        slots = copy_experts(bank, slots, layer, plan.load_expert,
                             plan.load_slot, plan.num_loads)
        rows = jnp.maximum(plan.slot_of_expert[ids], 0)
        y = moe.expert_ffn(x, slots.layer(layer), rows)
        return slots, jnp.where(plan.chunk[ids][..., None], y, out)

      ls, (slots, out) = pager.page_layer(self.policy, ls, needed, state.tick,
                                          (slots, out), on_chunk)
    else:
      # Hot set from the slots, misses through a scratch table appended to
      # them: one expert_ffn call over both (see moe's exactness note).
      resident = ls.slot_of_expert >= 0
      scratch, row, _ = _gather_transient(self.bank, layer,
                                          needed & ~resident, ids.size)
      table = jax.tree.map(lambda a, b: jnp.concatenate([a, b]),
                           slots.layer(layer), scratch)
      rows = jnp.where(resident, ls.slot_of_expert,
                       ls.expert_in_slot.shape[0] + row)
      out = moe.expert_ffn(x, table, rows[ids])
      ls = pager.count_pinned(ls, needed)
    state = pager.set_layer_state(state, layer, ls)
    if layer == num_layers - 1:
      state = state.replace(tick=state.tick + 1)
    return out, (slots, state)


@dataclasses.dataclass(frozen=True)
class PagingSpec(SourceSpec):
  """Static description of a source (hashable, jit-static).

  Attributes:
    kind: one of `SOURCES`.
    policy: policy name (paged only).
    policy_options: sorted (name, value) pairs of the policy's options.
  """
  kind: str
  policy: str = "lru"
  policy_options: tuple = ()

  def build(self, bank):
    if self.kind == "resident":
      return CountingResidentSource(bank)
    if self.kind == "static_offload":
      return StaticOffloadSource(bank)
    if self.kind == "transient":
      return TransientSource(bank)
    return PagedSource(bank, _policy(self.policy, self.policy_options))

  @staticmethod
  def counters(carry):
    """(hits, misses, loads) `[L]` arrays of a carry."""
    traffic = carry[1] if isinstance(carry, tuple) else carry
    return traffic.hits, traffic.misses, traffic.loads


@functools.lru_cache(maxsize=None)
def _policy(name, options):
  return get_policy(name, **dict(options))
