"""Expert sources behind the model's interface, and their specs: resident
(counting), static offload at a budget (vLLM `--cpu-offload-gb`: keep what
fits, stream the rest on every pass), layer offload (stream every expert
of every layer), transient (use-then-evict) and paged.

Each source's carry counts, per layer and in experts: hits (needed and
already on device), misses (needed and not) and loads (experts copied host
-> device, the traffic). Bytes = loads x `bytes_per_expert` on the host, so
int32 counters never overflow on real models.

Every source computes with `moe.expert_ffn` and hands its output on
straight from it (see the exactness rule in `wisp_jax.models.moe`); the
layer index is traced (the decoder loops over layers).

Specs (`SourceSpec`) are static and hashable; each owns its carry's layout:
`init_carry`, `counters` and, for the pager, `pager_state` and `resize`.

The paged source may also prefetch (`PagedSpec.prefetch`, a predictor of
`wisp_jax.paging.predictors`): after layer l is served, the predicted
experts of layer l+1 (`cooccur`, `gate`) or of layer l at the next step
(`temporal`) are copied into free or evictable slots
(`pager.prefetch_layer`). Its counters (`prefetch_counters`) are apart
from hits, misses and loads, which mean what they mean without prefetch.
A policy that ranks by gate weights (`lrfu_gate`) and the `gate`
predictor read the routers `[L, D, E]` (`PagedArrays`): the source
recomputes the step's gate weights, and the lookahead, from the layer's
input with the same ops as the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wisp_jax.models import device, moe
from wisp_jax.models.experts import SourceSpec
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging import pager
from wisp_jax.paging import predictors as predictors_lib
from wisp_jax.paging import resize as resize_lib
from wisp_jax.paging.policies import gate_mass, get_policy

SOURCES = ("resident", "static_offload", "layer_offload", "transient",
           "paged")


@struct.dataclass
class Traffic:
  """Carry of the non-paged sources; fields as in `PagerState`.

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


@struct.dataclass
class PagedCarry:
  """Carry of the paged source.

  Attributes:
    slots: `[L, S, ...]` device slot buffer (`ExpertWeights`, stored dtype).
    state: the `PagerState` (residency, policy state, counters, tick).
    predictor: the prefetch predictor's state, leaves `[L, ...]` (None
      without prefetch).
    last_needed: `[L, E]` bool each layer's needed set at its last step
      (None without prefetch).
    lookahead: `[L, B, T, K]` int32 the gate lookahead's top-k for layer
      l+1 of each token of the pass, made at layer l (-1: none), when
      recorded (`PagedSpec.with_lookahead`), else None.
    tier_loads: `[L]` int32 loads served by a tiered bank's device tier
      (counted in the pager's loads too; None without a tier).
  """
  slots: moe.ExpertWeights
  state: pager.PagerState
  predictor: Any = None
  last_needed: jax.Array | None = None
  lookahead: jax.Array | None = None
  tier_loads: jax.Array | None = None


@struct.dataclass
class PagedArrays:
  """Arrays of a paged source that reads the routers.

  Attributes:
    bank: `[L, E, ...]` host bank.
    router: `[L, D, E]` device router weights (the decoder's).
  """
  bank: moe.ExpertWeights
  router: jax.Array


_to_device = bank_lib.to_device


def _host_piece(src, layer, expert):
  """`[1, 1, ...]` expert `expert` of `layer` from a host stack, on the
  device (a coded stack's code crosses and is decoded there)."""
  if isinstance(src, bank_lib.PackedStack):
    return src.expert(layer, expert)[None, None]
  piece = jax.lax.dynamic_slice(src, (layer, expert, 0, 0),
                                (1, 1) + src.shape[2:])
  return _to_device(piece)


def _piece(src, layer, expert):
  """One expert from a bank stack; a tiered stack decodes it from its
  device tier when it holds the expert (nothing crosses PCIe then)."""
  if not isinstance(src, bank_lib.TieredStack):
    return _host_piece(src, layer, expert)
  row = src.row[layer, expert]
  return jax.lax.cond(
      row >= 0,
      lambda: src.tier.expert(layer, jnp.maximum(row, 0))[None, None],
      lambda: _host_piece(src.host, layer, expert))


def tier_copies(bank: moe.ExpertWeights, layer, experts, count) -> jax.Array:
  """`[]` int32: how many of the first `count` `experts` of `layer` a
  tiered bank's device tier serves (0 for other banks)."""
  if not bank_lib.is_tiered(bank):
    return jnp.zeros((), jnp.int32)
  inside = bank.gate.row[layer, experts] >= 0
  return jnp.sum(inside & (jnp.arange(experts.shape[0]) < count),
                 dtype=jnp.int32)


def copy_experts(bank: moe.ExpertWeights, slots: moe.ExpertWeights, layer,
                 experts, dest, count) -> moe.ExpertWeights:
  """Copies `count` experts of `layer` from the bank into device rows.

  A `fori_loop` over the compacted copy list (dynamic trip count): each
  iteration slices one expert from the host bank with traced indices and
  moves it with `jax.device_put` into its row, in place (or decodes it
  from a tiered bank's device tier, `bank.TieredStack`).

  Args:
    bank: `[L, E, ...]` host bank.
    slots: `[L, S, ...]` or `[R, ...]` device buffer.
    layer: layer index (traced).
    experts: `[M]` int32 expert ids (first `count` valid).
    dest: `[M]` int32 destination rows.
    count: `[]` int32.
  """
  per_layer = slots.gate.ndim == bank.gate.ndim

  def body(i, slots):
    def put(dst, src):
      piece = _piece(src, layer, experts[i])
      if per_layer:
        return jax.lax.dynamic_update_slice(dst, piece, (layer, dest[i], 0, 0))
      return jax.lax.dynamic_update_slice(dst, piece[0], (dest[i], 0, 0))
    return moe.ExpertWeights(*(put(d, b) for d, b in (
        (slots.gate, bank.gate), (slots.up, bank.up),
        (slots.down, bank.down))))

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
  scratch = bank_lib.zeros_rows(bank, (rows,))
  scratch = copy_experts(bank, scratch, layer, experts,
                         jnp.arange(rows, dtype=jnp.int32), count)
  row = jnp.clip(jnp.cumsum(wanted) - 1, 0, rows - 1).astype(jnp.int32)
  return scratch, row, count


def _tick(carry):
  return carry.replace(tick=carry.tick + 1)


class CountingResidentSource:
  """All experts on device (the reference), counting every need as a hit."""

  def __init__(self, experts):
    self.experts = experts

  def layer(self, layer, x, ids, traffic):
    num_experts = self.experts.gate.shape[1]
    needed = pager.needed_mask(ids, num_experts)
    out = moe.expert_ffn(x, self.experts, ids, num_experts=num_experts,
                         layer=layer)
    return out, _count(traffic, layer, needed,
                       jnp.sum(needed, dtype=jnp.int32), 0)

  end_step = staticmethod(_tick)


@struct.dataclass
class OffloadArrays:
  """Arrays of the static-offload source.

  Attributes:
    bank: `[L, E, ...]` host bank.
    resident: `[L, R, ...]` device copies of experts `0 .. R-1` of every
      layer (R = the most any layer keeps; rows past a layer's count unused).
    count: `[L]` int32 experts each layer keeps resident.
  """
  bank: moe.ExpertWeights
  resident: moe.ExpertWeights
  count: jax.Array


class StaticOffloadSource:
  """Static offload at a budget (vLLM `--cpu-offload-gb`): each layer keeps
  its first `count[l]` experts on the device and streams all the others on
  every pass, needed or not. `count = 0` everywhere is layer offload."""

  def __init__(self, arrays: OffloadArrays, min_kept: int):
    self.arrays = arrays
    self.min_kept = min_kept  # static: sizes the scratch table

  def layer(self, layer, x, ids, traffic):
    bank, resident = self.arrays.bank, self.arrays.resident
    num_experts = bank.gate.shape[1]
    kept = self.arrays.count[layer]
    streamed = num_experts - kept
    # The streamed experts kept .. E-1, in id order, into a scratch table.
    rows = num_experts - self.min_kept
    scratch = bank_lib.zeros_rows(bank, (rows,))
    experts = kept + jnp.arange(rows, dtype=jnp.int32)
    scratch = copy_experts(bank, scratch, layer, experts,
                           jnp.arange(rows, dtype=jnp.int32), streamed)
    is_kept = ids < kept
    out = jnp.zeros(ids.shape + (x.shape[1],), x.dtype)
    if resident.gate.shape[1]:
      out = moe.expert_ffn(x, resident, jnp.where(is_kept, ids, 0),
                           num_experts=num_experts, layer=layer, out=out,
                           select=is_kept)
    out = moe.expert_ffn(x, scratch, jnp.maximum(ids - kept, 0),
                         num_experts=num_experts, out=out, select=~is_kept)
    needed = pager.needed_mask(ids, num_experts)
    hits = jnp.sum(needed & (jnp.arange(num_experts) < kept), dtype=jnp.int32)
    return out, _count(traffic, layer, needed, hits, streamed)

  end_step = staticmethod(_tick)


class TransientSource:
  """Use-then-evict: only the needed experts are copied, nothing is kept."""

  def __init__(self, bank):
    self.bank = bank

  def layer(self, layer, x, ids, traffic):
    num_experts = self.bank.gate.shape[1]
    needed = pager.needed_mask(ids, num_experts)
    scratch, row, loads = _gather_transient(self.bank, layer, needed,
                                            ids.size)
    out = moe.expert_ffn(x, scratch, row[ids], num_experts=num_experts)
    return out, _count(traffic, layer, needed, 0, loads)

  end_step = staticmethod(_tick)


class PagedSource:
  """The working-set pager: a slot cache per layer fed from the host bank,
  optionally prefetching (see the module docstring)."""

  def __init__(self, bank, policy, router=None, predictor=None,
               prefetch_size: int = -1, prefetch_limit: int = -1,
               top_k: int = 0, norm_topk_prob: bool = True):
    self.bank = bank
    self.policy = policy
    self.router = router
    self.predictor = predictor
    self.prefetch_size = prefetch_size
    self.prefetch_limit = prefetch_limit
    self.top_k = top_k
    self.norm_topk_prob = norm_topk_prob

  def _route(self, layer, x):
    """The model's routing of `x` by the router of `layer` (same ops)."""
    return moe.route(x @ self.router[layer], self.top_k, self.norm_topk_prob,
                     x.dtype)

  def layer(self, layer, x, ids, carry: PagedCarry):
    slots, state = carry.slots, carry.state
    num_experts = self.bank.gate.shape[1]
    ffn = functools.partial(moe.expert_ffn, x, num_experts=num_experts)
    needed = pager.needed_mask(ids, num_experts)
    ls = pager.layer_state(state, layer)
    out = jnp.zeros(ids.shape + (x.shape[1],), x.dtype)
    if self.policy.evicts:
      bank = self.bank

      def on_chunk(data, plan):
        # Copy the group's misses in, then compute the group's pairs from
        # the slots into `out` (the other pairs keep their values).
        slots, out, tiered = data
        slots = copy_experts(bank, slots, layer, plan.load_expert,
                             plan.load_slot, plan.num_loads)
        tiered = tiered + tier_copies(bank, layer, plan.load_expert,
                                      plan.num_loads)
        rows = jnp.maximum(plan.slot_of_expert[ids], 0)
        out = ffn(slots, rows, layer=layer, out=out, select=plan.chunk[ids])
        return slots, out, tiered

      gates = None
      if self.policy.uses_gates:
        own_ids, own_weights = self._route(layer, x)
        gates = gate_mass(own_ids, own_weights, num_experts)
      ls, (slots, out, tiered) = pager.page_layer(
          self.policy, ls, needed, state.tick,
          (slots, out, jnp.zeros((), jnp.int32)), on_chunk, gates=gates)
    else:
      # The hot set from the slots, then the misses from a scratch table.
      resident = ls.slot_of_expert >= 0
      scratch, row, _ = _gather_transient(self.bank, layer,
                                          needed & ~resident, ids.size)
      out = ffn(slots, jnp.maximum(ls.slot_of_expert[ids], 0), layer=layer,
                out=out, select=resident[ids])
      out = ffn(scratch, row[ids], out=out, select=~resident[ids])
      ls = pager.count_pinned(ls, needed)
      missed = needed & ~resident
      tiered = tier_copies(self.bank, layer, pager.compact(
          missed, ids.size, num_experts), jnp.sum(missed, dtype=jnp.int32))
    state = pager.set_layer_state(state, layer, ls)
    if carry.tier_loads is not None:  # the loads the device tier served
      carry = carry.replace(tier_loads=carry.tier_loads.at[layer].add(tiered))
    carry = carry.replace(slots=slots, state=state)
    if self.predictor is not None:
      carry = self._prefetch(layer, x, ids, needed, carry)
    return out, carry

  def _prefetch(self, layer, x, ids, needed, carry: PagedCarry):
    """Learns from this layer's needed set, then prefetches the predicted
    experts of the predictor's target (see the module docstring)."""
    p = self.predictor
    state = carry.state
    num_layers, num_experts = state.slot_of_expert.shape
    last = carry.last_needed
    pstates = carry.predictor
    if p.learns:
      if p.target == "next_layer":  # layer l-1 -> l, this step
        source = last[jnp.maximum(layer - 1, 0)] & (layer > 0)
      else:  # layer l at the previous step -> now
        source = last[layer]
      mine = jax.tree.map(lambda s: s[layer], pstates)
      mine = p.update(mine, source, needed)
      pstates = jax.tree.map(lambda full, part: full.at[layer].set(part),
                             pstates, mine)
    last = last.at[layer].set(needed)
    if p.target == "next_step":
      target, valid, protect = layer, True, needed
    else:
      target = jnp.minimum(layer + 1, num_layers - 1)
      valid, protect = layer + 1 < num_layers, jnp.zeros_like(needed)
    if p.given == "lookahead":
      look_ids, _ = self._route(target, x)
      given = predictors_lib.lookahead_counts(look_ids, num_experts)
      if carry.lookahead is not None:
        record = jnp.where(valid, look_ids, -1).reshape(
            carry.lookahead.shape[1:])
        carry = carry.replace(lookahead=carry.lookahead.at[layer].set(record))
    else:
      given = needed.astype(jnp.int32)
    scores = p.predict(jax.tree.map(lambda s: s[target], pstates), given)
    ls = pager.layer_state(state, target)
    size = (pager.default_prefetch_size(ls.capacity,
                                        jnp.sum(needed, dtype=jnp.int32))
            if self.prefetch_size < 0 else jnp.int32(self.prefetch_size))
    limit = size if self.prefetch_limit < 0 else jnp.int32(
        self.prefetch_limit)
    limit = jnp.where(valid, limit, 0)
    bank = self.bank

    def on_copy(slots, plan):
      return copy_experts(bank, slots, target, plan.load_expert,
                          plan.load_slot, plan.num_loads)

    ls, slots = pager.prefetch_layer(self.policy, ls, scores, size, protect,
                                     limit, state.tick, carry.slots, on_copy)
    state = pager.set_layer_state(state, target, ls)
    return carry.replace(slots=slots, state=state, predictor=pstates,
                         last_needed=last)

  @staticmethod
  def end_step(carry: PagedCarry) -> PagedCarry:
    return carry.replace(state=_tick(carry.state))


class _TrafficCounters:
  """The carry of the sources that keep no slots: hits, misses, loads."""

  @staticmethod
  def init_carry(num_layers: int) -> Traffic:
    return Traffic.zeros(num_layers)

  @staticmethod
  def counters(carry: Traffic):
    return carry.hits, carry.misses, carry.loads


@dataclasses.dataclass(frozen=True)
class TrafficSpec(_TrafficCounters, SourceSpec):
  """Spec of a source without a cache; `name` picks which.

  Attributes:
    name: "resident" or "transient".
  """
  name: str

  def __post_init__(self):
    if self.name not in ("resident", "transient"):
      raise ValueError(f"TrafficSpec serves resident or transient sources, "
                       f"not {self.name!r}.")

  def build(self, arrays):
    if self.name == "resident":
      return CountingResidentSource(arrays)
    return TransientSource(arrays)



@dataclasses.dataclass(frozen=True)
class StaticOffloadSpec(_TrafficCounters, SourceSpec):
  """Spec of static offload at a budget, or layer offload (nothing kept).

  Attributes:
    name: "static_offload" or "layer_offload".
    min_kept: fewest experts any layer keeps resident (static: the scratch
      table streams the E - min_kept others).
  """
  name: str = "static_offload"
  min_kept: int = 0

  def build(self, arrays: OffloadArrays):
    return StaticOffloadSource(arrays, self.min_kept)

  @staticmethod
  def init_arrays(bank: moe.ExpertWeights, kept) -> OffloadArrays:
    """The bank, device copies of each layer's first `kept[l]` experts and
    the counts `[L]`."""
    if bank_lib.is_compressed(bank):
      raise ValueError("static and layer offload stream a raw bank; a "
                       "compressed bank serves 'transient' and 'paged'.")
    kept = np.asarray(kept, np.int32)
    most = int(kept.max())
    resident = _copy_first(bank, most)
    return OffloadArrays(bank=bank, resident=resident,
                         count=jax.device_put(kept))



@functools.partial(jax.jit, static_argnums=1)
def _copy_first(bank: moe.ExpertWeights, rows: int) -> moe.ExpertWeights:
  """Device copies of experts `0 .. rows-1` of every layer of the bank."""
  return jax.tree.map(lambda w: _to_device(w[:, :rows]), bank)


@dataclasses.dataclass(frozen=True)
class PagedSpec(SourceSpec):
  """Spec of the paged source.

  Attributes:
    policy: policy name.
    policy_options: sorted (name, value) pairs of the policy's options.
    prefetch: predictor name (`predictors.LIVE_PREDICTORS`), "" for none.
    prefetch_options: sorted (name, value) pairs: `size`, the predicted set
      per layer and step (-1: `pager.default_prefetch_size`, the size of
      the layer's own needed set when below the capacity, else capacity -
      1), and `limit`, the most prefetch copies per layer and step (-1:
      `size`).
    top_k: the model's K (routing recomputed from the routers).
    norm_topk_prob: the model's top-k renormalisation.
  """
  policy: str = "lru"
  policy_options: tuple = ()
  prefetch: str = ""
  prefetch_options: tuple = ()
  top_k: int = 0
  norm_topk_prob: bool = True
  name: ClassVar[str] = "paged"

  @property
  def rule(self):
    return _policy(self.policy, self.policy_options)

  @property
  def predictor(self):
    return (predictors_lib.get_predictor(self.prefetch) if self.prefetch
            else None)

  @property
  def needs_router(self) -> bool:
    """Whether the source reads the routers (`PagedArrays`)."""
    return self.rule.uses_gates or self.prefetch == "gate"

  def build(self, arrays):
    options = dict(self.prefetch_options)
    if isinstance(arrays, PagedArrays):
      bank, router = arrays.bank, arrays.router
    else:
      bank, router = arrays, None
    return PagedSource(bank, self.rule, router, self.predictor,
                       int(options.get("size", -1)),
                       int(options.get("limit", -1)), self.top_k,
                       self.norm_topk_prob)

  def init_carry(self, bank: moe.ExpertWeights, num_slots: int, capacity,
                 hot_set=None) -> PagedCarry:
    """Empty slots (or the `pinned` hot set loaded) and a fresh state.

    Args:
      bank: `[L, E, ...]` host bank.
      num_slots: S, slot rows per layer of the buffer.
      capacity: usable slots per layer, int or `[L]`.
      hot_set: `[L, S]` experts resident from the start (-1: empty).
    """
    num_layers, num_experts = bank.gate.shape[:2]
    state = pager.init_state(self.rule, num_layers, num_experts, num_slots,
                             capacity, hot_set)
    slots = bank_lib.zeros_rows(bank, (num_layers, num_slots), device.zeros)
    carry = PagedCarry(slots=slots, state=state)
    if bank_lib.is_tiered(bank):
      carry = carry.replace(tier_loads=jax.device_put(
          np.zeros((num_layers,), np.int32)))
    if hot_set is not None:
      carry = _load_hot_set(bank, carry)
    if self.predictor is not None:
      one_layer = self.predictor.init(num_experts)
      carry = carry.replace(
          predictor=jax.tree.map(lambda x: jax.device_put(np.broadcast_to(
              np.asarray(x), (num_layers,) + x.shape).copy()), one_layer),
          last_needed=jax.device_put(np.zeros((num_layers, num_experts),
                                              bool)))
    return carry

  def with_lookahead(self, carry: PagedCarry, batch: int, width: int
                     ) -> PagedCarry:
    """`carry` recording the gate lookahead of a `[batch, width]` pass
    (`PagedCarry.lookahead`, reset to -1)."""
    if self.prefetch != "gate":
      raise ValueError("only prefetch='gate' computes a lookahead to record; "
                       f"this source prefetches {self.prefetch!r}.")
    num_layers = carry.state.slot_of_expert.shape[0]
    return carry.replace(lookahead=jax.device_put(np.full(
        (num_layers, batch, width, self.top_k), -1, np.int32)))

  @staticmethod
  def prefetch_counters(carry: PagedCarry):
    """Cumulative `(prefetch_loads, useful, wasted)`, each `[L]` int32."""
    s = carry.state
    return s.prefetch_loads, s.useful, s.wasted

  @staticmethod
  def counters(carry: PagedCarry):
    return carry.state.hits, carry.state.misses, carry.state.loads

  @staticmethod
  def tier_loads(carry: PagedCarry):
    """`[L]` loads a tiered bank's device tier served (None: no tier)."""
    return carry.tier_loads

  @staticmethod
  def pager_state(carry: PagedCarry) -> pager.PagerState:
    return carry.state

  @staticmethod
  def num_slots(carry: PagedCarry) -> int:
    return int(carry.state.expert_in_slot.shape[1])

  def resize(self, carry: PagedCarry, capacity
             ) -> tuple[PagedCarry, np.ndarray, np.ndarray]:
    """Sets every layer's capacity (`paging.resize`; `carry` is donated).

    Returns:
      the new carry, and per layer `[L]` the slot rows moved and the
      residents evicted.
    """
    state, slots, moved, evicted = resize_lib.resize(
        carry.state, carry.slots, capacity, self.policy, self.policy_options)
    return carry.replace(slots=slots, state=state), moved, evicted


@jax.jit
def _load_hot_set(bank, carry: PagedCarry) -> PagedCarry:
  """Copies every layer's hot set (the occupied slots) from the bank."""

  def one_layer(layer, carry):
    occupant = carry.state.expert_in_slot[layer]
    count = jnp.sum(occupant >= 0, dtype=jnp.int32)
    # Occupied slots first, so the first `count` copies are the real ones.
    dest = pager.compact(occupant >= 0, occupant.shape[0], 0)
    slots = copy_experts(bank, carry.slots, layer, occupant[dest], dest,
                         count)
    state = carry.state.replace(loads=carry.state.loads.at[layer].add(count))
    return carry.replace(slots=slots, state=state)

  return jax.lax.fori_loop(0, carry.state.expert_in_slot.shape[0], one_layer,
                           carry)


def spec_for(kind: str, policy: str = "lru",
             policy_options: tuple = (), **paged) -> SourceSpec:
  """The spec of source `kind` (one of `SOURCES`); `paged` takes the
  other `PagedSpec` fields (prefetch, prefetch_options, top_k, ...)."""
  if kind not in SOURCES:
    raise ValueError(f"Unknown expert source {kind!r}; known sources: "
                     f"{', '.join(SOURCES)}.")
  if kind == "paged":
    return PagedSpec(policy, tuple(policy_options), **paged)
  if kind in ("static_offload", "layer_offload"):
    return StaticOffloadSpec(kind)
  return TrafficSpec(kind)


@functools.lru_cache(maxsize=None)
def _policy(name, options):
  return get_policy(name, **dict(options))
