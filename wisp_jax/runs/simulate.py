"""Offline what-if study: hit rates by replay, decode speed by the cost model.

`run(config, workdir)` (fields in configs/simulate.py):

  1. Loads a routing trace: a `.npz` `RoutingTrace`, a synthetic one drawn
     with the model preset's L/E/K, or "record:default" (the shipped model
     recorded on real-text prompts).
  2. Replays it (`wisp_jax.sim.replay`) for every policy, MIN included, at
     every capacity of the config and every slot count a budget allows.
  3. For every device budget predicts decode tokens/s (`wisp_jax.sim.cost`)
     of every mode at that same budget, over the trace's decode steps. The
     expert budget is what is left after the dense weights (bf16), the KV
     reserve (max decode batch x `context_len` tokens) and the workspace:
       resident        fits if all weights do.
       static_offload  vLLM `--cpu-offload-gb`: the experts that fit stay
                       resident, the rest cross PCIe on every step.
       layer_offload   all L x E experts cross PCIe every step (reference).
       transient       the needed experts of every step; fits if a scratch
                       of min(E, max batch x K) experts does.
       pinned          the slots hold a static hot set chosen on the first
                       `pinned_profile_fraction` of the trace (a profiling
                       run, llama.cpp `--n-cpu-moe` / MoE-Infinity style);
                       misses stream.
       paged           the working-set pager (`paged_policy`): S slots in
                       every layer plus the leftover as one more slot in
                       the layers where the replay says it helps most;
                       cannot run when S < top_k.
     Offload modes read streamed experts in place (UVA): no staging buffer
     is charged to them, which favours the baselines. Expert and KV widths
     are `expert_bytes_per_param` (2 bf16, 1 int8, 0.5 int4) and
     `kv_bytes_per_value`. Imported traces without phases get them
     inferred (`RoutingTrace.with_inferred_phases`), with a note.
  4. Writes `summary.json` (with `table`, the headline table), `config.json`,
     `metrics.jsonl` (one line per replay and per budget) and two plots:
     `hit_rate.png` (hit rate vs slots per layer, per policy) and
     `tokens_per_s.png` (the iso-budget Pareto: tokens/s vs budget, one
     line per mode, log scale).

Budgets above the hardware profile's memory are refused unless
`allow_oversize` is set (what-if studies).

Bytes come from the model preset. A recorded or imported trace must have
the preset's E (routing of E experts with another model's expert sizes
would be meaningless); when only L or K differ, the preset is used with the
trace's L and K (expert bytes unchanged) and a note says so.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.runs import common
from wisp_jax.models.config import MoEConfig, get_config as get_preset
from wisp_jax.paging.policies import get_policy, most_used
from wisp_jax.sim import cost, mrc, replay
from wisp_jax.sim.hardware import get_profile
from wisp_jax.traces import synthetic
from wisp_jax.traces.trace import PREFILL, RoutingTrace

GENERATORS = {"uniform": synthetic.uniform, "zipf": synthetic.zipf,
              "sticky": synthetic.sticky,
              "cross_layer": synthetic.cross_layer}


def load_trace(config: ml_collections.ConfigDict, preset: MoEConfig
               ) -> RoutingTrace:
  """The trace named by `config.trace` (see the module docstring)."""
  spec = str(config.trace)
  if spec.startswith("synthetic"):
    s = config.synthetic
    kind = spec.partition(":")[2] or s.kind
    if kind not in GENERATORS:
      raise ValueError(f"unknown synthetic trace kind {kind!r}; use one of "
                       f"{', '.join(GENERATORS)} (e.g. trace='synthetic:"
                       "sticky').")
    options = _as_dict(s.get("options"))
    return GENERATORS[kind](preset.num_layers, preset.num_experts,
                            preset.top_k, s.num_requests,
                            s.tokens_per_request, s.batch, seed=s.seed,
                            **options)
  if spec.startswith("record:"):
    from wisp_jax.serving import record  # Loads the model: lazily.
    if spec != "record:default":
      raise ValueError(f"trace={spec!r}: only 'record:default' (the shipped "
                       "model) can be recorded here; record others with "
                       "experiments/record.py and pass the .npz path.")
    r = config.record
    return record.record_default(r.num_prompts, r.max_prompt_bytes,
                                 r.max_new_tokens, r.batch_size)
  if not pathlib.Path(spec).is_file():
    raise ValueError(f"trace={spec!r} is neither 'synthetic[:kind]', "
                     "'record:default' nor an existing .npz file.")
  return RoutingTrace.load(spec)


def model_for_trace(preset: MoEConfig, trace: RoutingTrace
                    ) -> tuple[MoEConfig, list[str]]:
  """The preset, adapted to the trace's L and K; refuses another E."""
  if trace.num_experts != preset.num_experts:
    raise ValueError(
        f"the trace routes over E={trace.num_experts} experts per layer but "
        f"model preset {preset.name!r} has E={preset.num_experts}; pick the "
        "preset of the model that produced the trace (e.g. 'default' for "
        "record:default) or a synthetic trace.")
  notes = []
  if (trace.num_layers, trace.top_k) != (preset.num_layers, preset.top_k):
    notes.append(f"trace has L={trace.num_layers}, K={trace.top_k}; preset "
                 f"{preset.name} has L={preset.num_layers}, K="
                 f"{preset.top_k}: bytes use the preset's expert and dense "
                 "sizes with the trace's L and K.")
    preset = preset.replace(num_layers=trace.num_layers, top_k=trace.top_k)
  return preset, notes


def decode_steps(trace: RoutingTrace, batching: str) -> np.ndarray:
  """`[S]` bool: replay steps with no prefill token (timed for tokens/s)."""
  ordinals = replay.step_ordinals(trace, batching)
  num_steps = int(ordinals[-1]) + 1 if ordinals.size else 0
  prefill = np.zeros(num_steps, bool)
  prefill[ordinals[trace.phase == PREFILL]] = True
  return ~prefill


class _Timer:
  """Decode time of a trace's steps under one mode, memoised `step_cost`."""

  def __init__(self, model: MoEConfig, profile, context_len: int,
               batch: np.ndarray, needed: np.ndarray, expert_width: float,
               kv_width: float, compression_ratio: float = 1.0,
               decode_bytes_per_s: float | None = None):
    self.model, self.profile, self.context_len = model, profile, context_len
    self.batch, self.needed = batch, needed
    self.expert_width, self.kv_width = expert_width, kv_width
    self.compression_ratio = compression_ratio
    self.decode_bytes_per_s = decode_bytes_per_s
    self.one_expert = cost.expert_bytes(model, expert_width)
    self._cache: dict[tuple[int, ...], float] = {}

  def tokens_per_s(self, moved: np.ndarray,
                   decoded: np.ndarray | None = None) -> float:
    """Decode tokens / total predicted time, with `moved` experts per step
    (uncompressed), or, given `decoded` (experts decoded per step),
    compressed moves and on-device decoding."""
    compressed = decoded is not None
    decoded = np.zeros_like(moved) if decoded is None else decoded
    rows = np.stack([self.batch, self.needed, moved, decoded], axis=1)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    seconds = np.empty(len(unique))
    for i, (b, n, m, d) in enumerate(unique.tolist()):
      key = (b, n, m, d, compressed)
      if key not in self._cache:
        self._cache[key] = cost.step_cost(
            self.model, self.profile, batch=b, context_len=self.context_len,
            mode="paged", misses=m, needed_experts=n,
            expert_bytes_per_param=self.expert_width,
            kv_bytes_per_value=self.kv_width,
            compression_ratio=self.compression_ratio if compressed else 1.0,
            decode_bytes_per_s=self.decode_bytes_per_s,
            decoded_experts=d).total_s
      seconds[i] = self._cache[key]
    total = float(seconds[inverse.reshape(-1)].sum())
    return float(self.batch.sum()) / total if total > 0 else 0.0


def _capacities(config, model: MoEConfig) -> list[int]:
  caps = [int(c) for c in _names(config.capacities)] if isinstance(
      config.capacities, str) else [int(c) for c in config.capacities]
  if not caps:
    caps = np.unique(np.linspace(model.top_k, model.num_experts, 8).round()
                     ).astype(int).tolist()
  bad = [c for c in caps if not 1 <= c <= model.num_experts]
  if bad:
    raise ValueError(f"capacities {bad} lie outside [1, E="
                     f"{model.num_experts}]; use slots per layer in that "
                     "range.")
  return sorted(set(caps))


def _budget_plan(model: MoEConfig, budget: int, kv_reserve: int,
                 workspace: int, max_batch: int, expert_width: float
                 ) -> dict[str, Any]:
  """What each mode keeps on the device in `budget` bytes.

  The expert budget is what is left after dense weights (bf16), the KV
  reserve and the workspace. Static and layer offload stream through
  host memory the GPU reads directly (vLLM's UVA; no staging buffer is
  charged to them); transient needs a scratch of one step's experts; paged
  and pinned spend it on slots: a uniform S per layer, and the leftover
  (less than one slot per layer) as one more slot in as many layers as it
  pays for (chosen by replayed hit gain, see `_spread`).
  """
  num_layers, num_experts = model.num_layers, model.num_experts
  dense = cost.dense_bytes(model)
  one = cost.expert_bytes(model, expert_width)
  left = budget - dense - kv_reserve - workspace
  experts = max(left, 0) // one
  slots = min(experts // num_layers, num_experts)
  extra = 0 if slots == num_experts else int(experts - slots * num_layers)
  return {
      "expert_bytes_budget": int(left),
      "resident": (cost.model_bytes(model, 2, expert_width) + kv_reserve
                   + workspace <= budget),
      "static_offload": left >= 0,
      "resident_experts": int(min(experts, num_layers * num_experts)),
      "layer_offload": left >= 0,
      "transient": experts >= min(num_experts, max_batch * model.top_k),
      "paged": slots >= model.top_k,
      "slots_per_layer": int(slots),
      "extra_slots": int(min(extra, num_layers)),
  }


def _spread(results: dict[int, replay.ReplayResult], slots: int, extra: int
            ) -> np.ndarray:
  """`[L]` slots per layer: `slots` each, +1 in the `extra` layers whose
  loads drop most from `slots` to `slots + 1` (ties: lower layer)."""
  caps = np.full(results[slots].loads.shape, slots, np.int64)
  if extra and slots + 1 in results:
    gain = results[slots].loads - results[slots + 1].loads
    order = np.lexsort((np.arange(gain.size), -gain))
    caps[order[:extra]] += 1
  return caps


def _per_layer_loads(results: dict[int, replay.ReplayResult],
                     caps: np.ndarray, timed: np.ndarray) -> np.ndarray:
  """`[S_decode]` loads per decode step with layer l at `caps[l]` slots:
  the pager runs every layer apart, so layers of different replays add."""
  per_layer = np.stack([results[int(c)].step_loads[:, layer]
                        for layer, c in enumerate(caps)], axis=1)
  return per_layer.sum(axis=1)[timed]


def _replay_all(trace: RoutingTrace, policies: list[str],
                all_options: dict[str, Any], capacities: list[int],
                batching: str, metrics
                ) -> tuple[dict[str, dict[int, replay.ReplayResult]],
                           dict[str, float]]:
  """Replays every policy at every capacity; one metrics line each."""
  results, seconds_per_policy = {}, {}
  for name in policies:
    options = _as_dict(all_options.get(name))
    start = time.perf_counter()
    # LRU replays every capacity in one stack-distance pass when it can.
    replayed = replay.replay_many(trace, name, capacities,
                                  policy_options=options, batching=batching)
    seconds = time.perf_counter() - start
    results[name] = dict(zip(capacities, replayed))
    for capacity, r in results[name].items():
      metrics.write(json.dumps({
          "kind": "replay", "policy": name, "capacity": capacity,
          "hit_rate": r.hit_rate, "hits": int(r.hits.sum()),
          "misses": int(r.misses.sum()), "loads": int(r.loads.sum()),
          "policy_seconds": seconds,
          "events_per_s": len(capacities) * trace.num_events / max(
              seconds, 1e-9)}) + "\n")
    seconds_per_policy[name] = seconds
  return results, seconds_per_policy


def _modes(model: MoEConfig, plan: dict[str, Any], timer: "_Timer",
           results: dict[str, dict[int, replay.ReplayResult]],
           pinned: dict[int, replay.ReplayResult] | None,
           timed: np.ndarray, paged_policy: str) -> dict[str, Any]:
  """Speed and traffic of each mode under one budget's `plan`."""
  one = timer.one_expert
  tokens = float(timer.batch.sum())
  all_experts = model.num_layers * model.num_experts

  def row(fits, moved, **extra):
    return {"fits": bool(fits),
            "tokens_per_s": timer.tokens_per_s(moved) if fits else None,
            "bytes_per_token": float(moved.sum()) * one / tokens,
            "bytes_per_pass": float(moved.mean()) * one, **extra}

  needed = timer.needed
  kept = plan["resident_experts"]
  modes = {
      "resident": row(plan["resident"], np.zeros_like(needed)),
      "static_offload": row(plan["static_offload"],
                            np.full_like(needed, all_experts - kept),
                            resident_experts=kept),
      "layer_offload": row(plan["layer_offload"],
                           np.full_like(needed, all_experts)),
      "transient": row(plan["transient"], needed),
  }
  slots, extra = plan["slots_per_layer"], plan["extra_slots"]
  empty = {"fits": False, "tokens_per_s": None, "slots_per_layer": None}
  if not plan["paged"]:
    modes["pinned"], modes["paged"] = dict(empty), dict(empty, policies={})
    if timer.compression_ratio > 1:  # sized from the raw plan: none either
      for name in COMPRESSED_MODES:
        modes[name] = dict(empty)
    return modes
  caps = _spread(results[paged_policy], slots, extra)
  paged = {"slots_per_layer": caps.tolist(), "policies": {}}
  for name, by_capacity in results.items():
    moved = _per_layer_loads(by_capacity, caps, timed)
    paged["policies"][name] = row(True, moved,
                                  hit_rate=_hit_rate(by_capacity, caps))
  paged.update(paged["policies"][paged_policy])
  modes["paged"] = paged
  if pinned is not None:
    moved = _per_layer_loads(pinned, caps, timed)
    modes["pinned"] = row(True, moved, slots_per_layer=caps.tolist())
  else:
    modes["pinned"] = dict(empty)
  ratio = timer.compression_ratio
  if ratio > 1:
    by_capacity = results[paged_policy]
    moved = _per_layer_loads(by_capacity, caps, timed)
    # Compressed host bank: the same slots; misses cross compressed and
    # are decoded once on arrival.
    modes["paged_compressed_bank"] = _compressed_row(
        timer, moved, moved, tokens, slots_per_layer=caps.tolist())
    # Compressed device tier: the same bytes hold `ratio` times as many
    # (compressed) experts; every expert a step computes is decoded.
    tier = compressed_capacities(caps, ratio, model.num_experts)
    moved = _per_layer_loads(by_capacity, tier, timed)
    modes["paged_compressed_tier"] = _compressed_row(
        timer, moved, needed, tokens, slots_per_layer=tier.tolist(),
        hit_rate=_hit_rate(by_capacity, tier))
  return modes


def _hit_rate(by_capacity: dict[int, replay.ReplayResult], caps) -> float:
  """Hit rate with layer l at `caps[l]` slots, from per-capacity replays."""
  hits = sum(int(by_capacity[int(c)].hits[l]) for l, c in enumerate(caps))
  refs = sum(int(by_capacity[int(c)].references[l])
             for l, c in enumerate(caps))
  return hits / max(refs, 1)


def compressed_capacities(caps, ratio: float, num_experts: int) -> np.ndarray:
  """Slots per layer when the bytes of `caps` raw slots hold compressed
  experts (floor(c x ratio), at most E)."""
  return np.minimum(np.floor(np.asarray(caps) * ratio + 1e-9).astype(int),
                    num_experts)


def _compressed_row(timer: "_Timer", moved, decoded, tokens: float,
                    **extra) -> dict[str, Any]:
  one = timer.one_expert / timer.compression_ratio
  return {"fits": True, "tokens_per_s": timer.tokens_per_s(moved, decoded),
          "bytes_per_token": float(moved.sum()) * one / tokens,
          "bytes_per_pass": float(moved.mean()) * one,
          "decoded_per_pass": float(np.mean(decoded)), **extra}


def _as_dict(value) -> dict[str, Any]:
  """A plain dict from a ConfigDict, a dict or None."""
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def _option(config, name: str, default):
  """`config.<name>`, or `default` for configs written before the field."""
  return config[name] if name in config else default


def _check_budgets(config, profile) -> list[int]:
  """The budgets, refused above the profile's memory unless allowed."""
  budgets = [int(float(b)) for b in _budget_list(config.budget_bytes)]
  budgets = budgets or [profile.memory_bytes]
  if min(budgets) <= 0:
    raise ValueError(f"budget_bytes must be positive, got {budgets}.")
  over = [b for b in budgets if b > profile.memory_bytes]
  if over and not _option(config, "allow_oversize", False):
    raise ValueError(
        f"budgets {[_fmt_bytes(b) for b in over]} exceed {profile.name}'s "
        f"{_fmt_bytes(profile.memory_bytes)} of device memory; lower "
        "budget_bytes, pick another hardware profile, or set "
        "--config.allow_oversize=True for a what-if study.")
  return sorted(budgets)


def _budget_list(value) -> list:
  """Budgets from a tuple/list or a comma-separated string of bytes (which
  may carry a GiB/MiB suffix, e.g. "4GiB,8GiB")."""
  if isinstance(value, str):
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
      for suffix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if item.endswith(suffix):
          out.append(float(item[:-len(suffix)]) * scale)
          break
      else:
        out.append(float(item))
    return out
  return list(value)


def _fmt_bytes(value: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(value) >= scale:
      return f"{value / scale:.3g} {unit}"
  return f"{int(value)} B"


def _profiling_hot_sets(trace: RoutingTrace, fraction: float,
                        capacities: list[int]) -> dict[int, np.ndarray]:
  """Pinned hot sets from the first `fraction` of the trace's steps (a
  profiling run), not from the whole trace (that would see the future)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"pinned_profile_fraction must lie in (0, 1], got "
                     f"{fraction}.")
  cut = np.quantile(np.unique(trace.step), fraction)
  profile = trace.select(trace.step <= cut)
  counts = np.zeros((trace.num_layers, trace.num_experts), np.int64)
  for layer in range(trace.num_layers):
    counts[layer] = np.bincount(profile.ids[:, layer].ravel(),
                                minlength=trace.num_experts)
  return {c: most_used(counts, c) for c in capacities}


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the study; returns the contents of `summary.json`."""
  preset = get_preset(config.model)
  profile = get_profile(config.hardware if isinstance(config.hardware, str)
                        else dict(config.hardware))
  policies = list(_names(config.policies))
  all_options = _as_dict(config.get("policy_options"))
  for name in policies:  # unknown names and options fail before any work
    get_policy(name, **_as_dict(all_options.get(name)))
  if config.paged_policy not in policies:
    raise ValueError(f"paged_policy={config.paged_policy!r} must be one of "
                     f"the replayed policies {policies}; add it to policies.")
  if config.batching not in replay.BATCHINGS:
    raise ValueError(f"batching must be one of {replay.BATCHINGS}, got "
                     f"{config.batching!r}.")
  if config.context_len < 0 or config.workspace_bytes < 0:
    raise ValueError(f"context_len ({config.context_len}) and "
                     f"workspace_bytes ({config.workspace_bytes}) must be "
                     ">= 0.")
  expert_width = float(_option(config, "expert_bytes_per_param", 2))
  kv_width = float(_option(config, "kv_bytes_per_value", 2))
  for name, width in (("expert_bytes_per_param", expert_width),
                      ("kv_bytes_per_value", kv_width)):
    if width not in (0.5, 1.0, 2.0, 4.0):
      raise ValueError(f"{name}={width} must be 0.5 (int4), 1 (int8), 2 "
                       "(bf16) or 4 (f32).")
  compression = _as_dict(_option(config, "compression", None))
  ratio = float(compression.get("ratio", 1.0))
  decode_rate = compression.get("decode_bytes_per_s")
  if ratio < 1:
    raise ValueError(f"compression.ratio must be >= 1 (1: off), got {ratio}.")
  if ratio > 1 and not (decode_rate or 0) > 0:
    raise ValueError("compression.ratio > 1 needs compression."
                     "decode_bytes_per_s > 0 (the device's decode rate in "
                     f"raw bytes per second), got {decode_rate}.")
  budgets = _check_budgets(config, profile)
  workdir = common.start(workdir, config)

  trace = load_trace(config, preset)
  model, notes = model_for_trace(preset, trace)
  trace, inferred = trace.with_inferred_phases()
  if inferred:
    notes.append(f"{inferred} events had no phase (an imported log); a "
                 "request with several tokens in one step was read as "
                 "prefill there, one token as decode. Only decode steps "
                 "are timed and sized for KV.")
  capacities = _capacities(config, model)
  timed = decode_steps(trace, config.batching)
  ordinals = replay.step_ordinals(trace, config.batching)
  batch = np.bincount(ordinals, minlength=timed.size)[timed]  # [S_decode]
  if batch.size == 0:
    raise ValueError(f"trace {trace.source!r} has no decode step to time.")
  max_batch = int(batch.max())
  kv_reserve = (max_batch * config.context_len
                * cost.kv_bytes_per_token(model, kv_width))
  plans = [_budget_plan(model, b, kv_reserve, config.workspace_bytes,
                        max_batch, expert_width) for b in budgets]
  if all(p["resident"] for p in plans):
    notes.append("every budget holds the whole model resident: the rows "
                 "differ only in what the offload modes would cost; pick "
                 "smaller budgets to see paging pay.")
  spread = {c for p in plans if p["paged"] for c in
            (p["slots_per_layer"], min(p["slots_per_layer"] + 1,
                                       model.num_experts))}
  if ratio > 1:
    spread |= {int(c) for c in compressed_capacities(sorted(spread), ratio,
                                                     model.num_experts)}
  replayed = sorted(set(capacities) | spread)
  fraction = float(_option(config, "pinned_profile_fraction", 0.25))
  hot_sets = _profiling_hot_sets(trace, fraction, sorted(spread))

  one = cost.expert_bytes(model, expert_width)
  with open(common.metrics_path(workdir), "w") as metrics:
    results, replay_seconds = _replay_all(trace, policies, all_options,
                                          replayed, config.batching, metrics)
    pinned = {c: replay.replay(trace, "pinned", c, hot_set=hot,
                               batching=config.batching)
              for c, hot in hot_sets.items()}
    any_result = results[policies[0]][replayed[0]]
    needed = (any_result.step_hits + any_result.step_misses).sum(axis=1)
    timer = _Timer(model, profile, config.context_len, batch, needed[timed],
                   expert_width, kv_width, ratio,
                   float(decode_rate) if decode_rate else None)
    budget_rows = []
    for budget, plan in zip(budgets, plans):
      modes = _modes(model, plan, timer, results, pinned or None, timed,
                     config.paged_policy)
      paged, static = (modes["paged"]["tokens_per_s"],
                       modes["static_offload"]["tokens_per_s"])
      row = {"budget_bytes": budget, "budget": _fmt_bytes(budget),
             "kv_reserve_bytes": kv_reserve, "plan": plan, "modes": modes,
             "paged_vs_static_offload": (paged / static if paged and static
                                         else None)}
      budget_rows.append(row)
      metrics.write(json.dumps({"kind": "budget", **row}) + "\n")
  curve = mrc.mattson(replay.needed_masks(trace, config.batching))
  tokens = int(batch.sum())

  summary = {
      "trace": {"source": trace.source, "model": trace.model,
                "num_layers": trace.num_layers,
                "num_experts": trace.num_experts, "top_k": trace.top_k,
                "num_events": trace.num_events, "batching": config.batching,
                "num_steps": int(timed.size),
                "decode_steps": int(timed.sum()), "decode_tokens": tokens,
                "max_decode_batch": max_batch},
      "model": {"preset": preset.name, "num_layers": model.num_layers,
                "num_experts": model.num_experts, "top_k": model.top_k,
                "expert_bytes": one, "expert_bytes_per_param": expert_width,
                "kv_bytes_per_value": kv_width,
                "dense_bytes": cost.dense_bytes(model),
                "model_bytes": cost.model_bytes(model, 2, expert_width),
                "all_experts_bytes_per_pass": cost.all_experts_bytes(
                    model, expert_width)},
      "hardware": {"name": profile.name,
                   "memory_bytes": profile.memory_bytes,
                   "h2d_bytes_per_s": profile.h2d_bytes_per_s,
                   "h2d_source": profile.h2d_source},
      "context_len": config.context_len, "notes": notes,
      "pinned_profile_fraction": fraction,
      "capacities": capacities,
      "hit_rate": {name: [results[name][c].hit_rate for c in capacities]
                   for name in policies},
      "layer_hit_rate": {
          name: [results[name][c].layer_hit_rate.tolist()
                 for c in capacities] for name in policies},
      "bytes_per_token": {
          name: [float(results[name][c].loads.sum()) * one
                 / trace.num_tokens for c in capacities]
          for name in policies},
      "mattson_lru_hit_rate": (curve.hits.sum(axis=0) / max(
          int(curve.references.sum()), 1)).tolist(),
      "replay_seconds": replay_seconds,
      "budgets": budget_rows,
  }
  summary["table"] = table(summary)
  common.finish(workdir, summary)
  _plot(summary, workdir, config.paged_policy)
  return summary


HEADLINE_MODES = ("resident", "static_offload", "layer_offload", "transient",
                  "pinned", "paged")
# With config.compression.ratio > 1 (zbank: compressed host bank, ztier:
# compressed device slots).
COMPRESSED_MODES = ("paged_compressed_bank", "paged_compressed_tier")


def table(summary: dict[str, Any]) -> str:
  """The headline table: decode tokens/s per mode at each budget, equal
  budgets for every mode, and paged / static offload."""
  modes = HEADLINE_MODES + tuple(
      m for m in COMPRESSED_MODES
      if summary["budgets"] and m in summary["budgets"][0]["modes"])
  short = {"paged_compressed_bank": "paged+zbank",
           "paged_compressed_tier": "paged+ztier"}
  header = (f"{'budget':>10} " + " ".join(f"{short.get(m, m):>14}"
                                          for m in modes)
            + f" {'paged/static':>13}")
  lines = [header]
  for row in summary["budgets"]:
    cells = []
    for mode in modes:
      value = row["modes"][mode]["tokens_per_s"]
      cells.append(f"{value:>14,.1f}" if value is not None else
                   f"{'cannot run':>14}")
    ratio = row["paged_vs_static_offload"]
    lines.append(f"{row['budget']:>10} " + " ".join(cells) +
                 (f" {ratio:>12.2f}x" if ratio else f" {'-':>13}"))
  return "\n".join(lines)


def report(summary: dict[str, Any], workdir: str) -> None:
  """Logs the hit rates, the headline table and the notes of a run."""
  logging.info("trace: %s (%d events)", summary["trace"]["source"],
               summary["trace"]["num_events"])
  logging.info("hit rate by slots per layer %s:", summary["capacities"])
  for name, rates in summary["hit_rate"].items():
    logging.info("  %-6s %s", name, " ".join(f"{r:.3f}" for r in rates))
  logging.info("decode tokens/s at equal device budgets (%s):\n%s",
               summary["hardware"]["name"], summary["table"])
  for note in summary["notes"]:
    logging.info("note: %s", note)
  logging.info("wrote %s/summary.json, hit_rate.png, tokens_per_s.png",
               workdir)


def _names(value) -> tuple[str, ...]:
  """Names from a tuple/list or a comma-separated string."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def _plot(summary: dict[str, Any], workdir: pathlib.Path,
          paged_policy: str) -> None:
  """Writes hit_rate.png and tokens_per_s.png."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  caps = summary["capacities"]
  mattson = summary["mattson_lru_hit_rate"]
  ax.plot(range(len(mattson)), mattson, color="0.7", lw=1,
          label="LRU (Mattson, every S)")
  rates_of = summary["hit_rate"]
  for name, rates in rates_of.items():
    label = name.upper() if name == "min" else name
    # At a fixed slot count ws evicts in LRU order (paging/policies.py), so
    # its line lies on LRU's: say so, and draw it dotted on top.
    same = (name == "ws" and "lru" in rates_of
            and np.allclose(rates, rates_of["lru"]))
    if same:
      label = "ws (= lru at a fixed slot count)"
    ax.plot(caps, rates, marker="." if same else "o",
            ls=":" if same else "--" if name == "min" else "-", label=label)
  t = summary["trace"]
  ax.set(xlabel="slots per layer", ylabel="hit rate", ylim=(0, 1.02))
  ax.set_title(f"{t['model'] or 'imported'} trace, {t['num_events']:,} "
               f"events, {t['batching']} batching", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "hit_rate.png", dpi=120)
  plt.close(fig)

  # The iso-budget Pareto (WiSP's figure 1): device memory on x, decode
  # tokens/s on y (log), one line per mode at equal budgets.
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  budgets = [row["budget_bytes"] for row in summary["budgets"]]
  unit, scale = ("GiB", 2**30) if max(budgets) >= 2**30 else (
      ("MiB", 2**20) if max(budgets) >= 2**20 else ("KiB", 2**10))
  xs = [b / scale for b in budgets]
  for mode in HEADLINE_MODES:
    values = [row["modes"][mode]["tokens_per_s"] for row in
              summary["budgets"]]
    label = f"paged ({paged_policy})" if mode == "paged" else mode
    if any(v is not None for v in values):
      ax.plot(xs, [np.nan if v is None else v for v in values], marker="o",
              label=label)
  bound = [row["modes"]["paged"].get("policies", {}).get("min", {}).get(
      "tokens_per_s") for row in summary["budgets"]]
  if any(v is not None for v in bound):
    ax.plot(xs, [np.nan if v is None else v for v in bound], ls="--",
            color="0.4", label="paged (MIN bound)")
  ax.set_yscale("log")
  m = summary["model"]
  ax.set(xlabel=f"device budget ({unit})", ylabel="predicted decode tokens/s")
  ax.set_title(f"{m['preset']} (experts at {m['expert_bytes_per_param']:g} "
               f"B/param) on {summary['hardware']['name']}, equal budgets",
               fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "tokens_per_s.png", dpi=120)
  plt.close(fig)
