"""Building expert sources for `generate`, and their statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.experts import SourceSpec
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging import pager
from wisp_jax.paging import predictors
from wisp_jax.paging.policies import get_policy, most_used
from wisp_jax.paging.sources import (SOURCES, PagedArrays, StaticOffloadSpec,
                                     spec_for)

PREFETCH_OPTIONS = ("size", "limit")


@dataclasses.dataclass
class ExpertStats:
  """Host-to-device expert traffic of one `generate` call.

  Attributes:
    source: the expert source's name.
    hits: `[L]` needed experts already on device, summed over passes.
    misses: `[L]` needed experts not on device.
    loads: `[L]` experts copied host -> device (>= misses when a step
      needs more experts than slots; all E per pass for static_offload).
    bytes_per_expert: bytes of one expert as stored.
    per_pass_loads: `[passes, L]` loads of each forward pass (prefill first).
    per_pass_hits: `[passes, L]`.
    per_pass_misses: `[passes, L]`.
    prefetch_loads: `[L]` experts copied by prefetches (not in `loads`;
      zeros without prefetch).
    useful_prefetches: `[L]` prefetched experts needed before eviction.
    wasted_prefetches: `[L]` prefetched experts evicted unused (the rest of
      `prefetch_loads` is still resident, unused, at the end).
    tier_loads: `[L]` loads decoded from a compressed device tier
      (`bank.make_tiered_bank`): counted in `loads`, none of their bytes
      cross PCIe (zeros without a tier).
  """
  source: str
  hits: np.ndarray
  misses: np.ndarray
  loads: np.ndarray
  bytes_per_expert: int
  per_pass_loads: np.ndarray
  per_pass_hits: np.ndarray
  per_pass_misses: np.ndarray
  prefetch_loads: np.ndarray | None = None
  useful_prefetches: np.ndarray | None = None
  wasted_prefetches: np.ndarray | None = None
  tier_loads: np.ndarray | None = None

  def __post_init__(self):
    for name in ("prefetch_loads", "useful_prefetches", "wasted_prefetches",
                 "tier_loads"):
      if getattr(self, name) is None:
        setattr(self, name, np.zeros_like(self.loads))

  @property
  def hit_rate(self) -> float:
    total = int(self.hits.sum() + self.misses.sum())
    return float(self.hits.sum()) / total if total else 1.0

  @property
  def bytes_moved(self) -> int:
    """All host-to-device expert bytes: demand loads (but those a device
    tier served) and prefetches."""
    return int(self.bytes_per_layer.sum())

  @property
  def bytes_per_layer(self) -> np.ndarray:
    return (self.loads.astype(np.int64) - self.tier_loads.astype(np.int64)
            + self.prefetch_loads.astype(np.int64)) * self.bytes_per_expert

  def summary(self) -> dict:
    return {"source": self.source, "hit_rate": self.hit_rate,
            "hits": int(self.hits.sum()), "misses": int(self.misses.sum()),
            "loads": int(self.loads.sum()), "bytes_moved": self.bytes_moved,
            "tier_loads": int(self.tier_loads.sum()),
            "prefetch_loads": int(self.prefetch_loads.sum()),
            "useful_prefetches": int(self.useful_prefetches.sum()),
            "wasted_prefetches": int(self.wasted_prefetches.sum())}


def stats_from_counters(source: str, counters: Sequence, bytes_per_expert: int,
                        prefetch_counters=None, tier_loads=None
                        ) -> ExpertStats:
  """Builds stats from cumulative `[3, L]` (hits, misses, loads) counters
  taken after each pass, the final `[3, L]` (prefetch loads, useful,
  wasted) counters of a prefetching pager and the final `[L]` device-tier
  loads of a tiered bank."""
  cum = np.stack(counters).astype(np.int64)  # [P, 3, L]
  per_pass = np.diff(cum, axis=0, prepend=0)
  prefetch = ([None] * 3 if prefetch_counters is None else
              [np.asarray(c, np.int64) for c in prefetch_counters])
  return ExpertStats(source=source, hits=cum[-1, 0], misses=cum[-1, 1],
                     loads=cum[-1, 2], bytes_per_expert=bytes_per_expert,
                     per_pass_hits=per_pass[:, 0], per_pass_misses=per_pass[:, 1],
                     per_pass_loads=per_pass[:, 2], prefetch_loads=prefetch[0],
                     useful_prefetches=prefetch[1],
                     wasted_prefetches=prefetch[2],
                     tier_loads=(None if tier_loads is None else
                                 np.asarray(tier_loads, np.int64)))


def hot_set_from_routing(routing_ids: Sequence[np.ndarray], num_experts: int,
                         slots: int) -> np.ndarray:
  """The `slots` most routed experts of each layer: a `pinned` hot set.

  Args:
    routing_ids: arrays `[L, ...]` of routed ids (e.g. `generate(...,
      record_routing=True).routing_ids`).
    num_experts: E.
    slots: S.

  Returns:
    `[L, S]` int32 (most used first, ties to the lower id).
  """
  num_layers = routing_ids[0].shape[0]
  counts = np.zeros((num_layers, num_experts), np.int64)
  for ids in routing_ids:
    flat = np.asarray(ids).reshape(num_layers, -1)
    for layer in range(num_layers):
      counts[layer] += np.bincount(flat[layer], minlength=num_experts)
  return most_used(counts, slots)


def validate_slots(config: MoEConfig, slots_per_layer) -> np.ndarray:
  """`[L]` slots per layer; raises unless top_k <= S <= E in every layer."""
  return pager.check_capacity(
      slots_per_layer, config.num_layers, config.top_k, config.num_experts,
      low_why=f"top_k={config.top_k}: one token's experts would not fit",
      high_why=f"its {config.num_experts} experts (use the resident source)",
      low_label=f"top_k={config.top_k}", high_label=f"E={config.num_experts}")


def make_source(config: MoEConfig, bank: moe.ExpertWeights, experts: str,
                slots_per_layer=None, policy: str = "lru",
                policy_options: dict | None = None, hot_set=None,
                num_slots: int | None = None, prefetch: str | None = None,
                prefetch_options: dict | None = None, router=None
                ) -> tuple[SourceSpec, Any, Any]:
  """Validates the request and builds (spec, arrays, carry) for a step.

  Args:
    config: the model's config.
    bank: `[L, E, ...]` host bank (`bank.make_bank`); for `resident`, the
      model's device experts (bf16 ones are re-stored as `uint16` bits, one
      device copy: see `moe.as_bits`).
    experts: one of `SOURCES`.
    slots_per_layer: S (int) or per-layer capacities `[L]` for `paged`;
      for `static_offload`, the experts each layer keeps resident (0 ..
      E; the rest cross PCIe on every pass; default 0).
    policy: paging policy name (paged only).
    policy_options: options of the policy, e.g. `{"tau": 4}` for ws.
    hot_set: `[L, S']` resident experts of `pinned` (S' <= capacity; the
      rest of the buffer stays empty).
    num_slots: slot rows per layer in the device buffer (default: the
      largest capacity). A larger buffer lets capacities change without
      recompiling; rows beyond a layer's capacity stay unused.
    prefetch: a predictor (`cooccur`, `temporal`, `gate`; paged only) whose
      predicted experts are copied ahead of need; None for no prefetch.
    prefetch_options: `{"size": m, "limit": c}`: predicted set and most
      prefetch copies per layer and step (default -1: the layer's needed
      set size if below the capacity, else capacity - 1; and `size`).
    router: `[L, D, E]` router weights of the model (the decoder's
      `layers.router`), needed by prefetch `gate` and by a policy that
      ranks by gate weights (`lrfu_gate`).
  """
  if experts not in SOURCES:
    raise ValueError(f"Unknown expert source {experts!r}; known sources: "
                     f"{', '.join(SOURCES)}.")
  bank_lib.check_bank(bank, config)
  if bank_lib.is_tiered(bank) and (experts != "paged" or prefetch):
    raise ValueError("a bank with a compressed device tier serves the paged "
                     "source without prefetch; got experts="
                     f"{experts!r}, prefetch={prefetch!r}.")
  if experts in ("static_offload", "layer_offload"):
    if experts == "layer_offload" and slots_per_layer not in (None, 0):
      raise ValueError("layer_offload keeps no expert resident; use "
                       "experts='static_offload' with slots_per_layer=R to "
                       "keep R experts of every layer on the device.")
    kept = pager.check_capacity(
        slots_per_layer or 0, config.num_layers, 0, config.num_experts,
        low_why="0", high_why=f"its {config.num_experts} experts (use the "
        "resident source)")
    spec = StaticOffloadSpec(experts, int(kept.min()))
    return (spec, spec.init_arrays(bank, kept),
            spec.init_carry(config.num_layers))
  if experts != "paged" and (prefetch or prefetch_options):
    raise ValueError(f"prefetch is a feature of experts='paged', not "
                     f"{experts!r}.")
  if experts != "paged":
    spec = spec_for(experts)
    if experts == "resident":  # device experts, read as stored bits
      bank = jax.tree.map(moe.as_bits, bank)
    return spec, bank, spec.init_carry(config.num_layers)
  if slots_per_layer is None:
    raise ValueError("experts='paged' needs slots_per_layer (top_k <= S <= E).")
  capacity = validate_slots(config, slots_per_layer)
  options = tuple(sorted((policy_options or {}).items()))
  rule = get_policy(policy, **dict(options))
  if rule.needs_hint:
    raise ValueError(f"policy {policy!r} needs future routing and only runs "
                     "in trace replay (wisp_jax.sim).")
  if num_slots is None:
    num_slots = int(capacity.max())
  if not capacity.max() <= num_slots <= config.num_experts:
    raise ValueError(f"num_slots={num_slots} must lie in [max capacity "
                     f"{capacity.max()}, num_experts {config.num_experts}].")
  if not rule.evicts and hot_set is None:
    raise ValueError(
        f"policy {policy!r} needs hot_set [L, S]; build one with "
        "wisp_jax.paging.api.hot_set_from_routing.")
  if hot_set is not None:
    hot_set = np.asarray(hot_set, np.int32)
    if hot_set.ndim == 2 and hot_set.shape[1] < num_slots:
      hot_set = np.pad(hot_set, ((0, 0), (0, num_slots - hot_set.shape[1])),
                       constant_values=-1)
  prefetch = prefetch or ""
  if prefetch and prefetch not in predictors.LIVE_PREDICTORS:
    raise ValueError(
        f"prefetch={prefetch!r} is not a live predictor; use one of "
        f"{', '.join(predictors.LIVE_PREDICTORS)} (others, such as 'oracle', "
        "run in trace replay: wisp_jax.sim.prefetch).")
  if prefetch and not rule.evicts:
    raise ValueError(f"policy {policy!r} never changes its slots; prefetch "
                     "needs an evicting policy.")
  pf_options = dict(prefetch_options or {})
  unknown = sorted(set(pf_options) - set(PREFETCH_OPTIONS))
  if unknown:
    raise ValueError(f"unknown prefetch_options {unknown}; known: "
                     f"{list(PREFETCH_OPTIONS)}.")
  for key, value in pf_options.items():
    if int(value) != value or value < -1:
      raise ValueError(f"prefetch_options[{key!r}] must be an int >= 0 (or -1"
                       f" for the default), got {value!r}.")
  spec = spec_for("paged", policy, options, prefetch=prefetch,
                  prefetch_options=tuple(sorted(
                      (k, int(v)) for k, v in pf_options.items())),
                  top_k=config.top_k, norm_topk_prob=config.norm_topk_prob)
  arrays = bank
  if spec.needs_router:
    if router is None:
      raise ValueError(
          f"policy {policy!r} / prefetch {prefetch!r} recompute routing and "
          "need the model's routers: pass router=model.decoder.layers.router"
          "[...] ([L, D, E]); generate does.")
    router = jax.device_put(router)
    want = (config.num_layers, config.d_model, config.num_experts)
    if router.shape != want:
      raise ValueError(f"router must have shape {want} ([L, D, E]), got "
                       f"{router.shape}.")
    arrays = PagedArrays(bank=bank, router=router)
  return spec, arrays, spec.init_carry(bank, num_slots, capacity, hot_set)
