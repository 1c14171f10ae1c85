"""Offline what-if study: hit rates by replay, decode speed by the cost model.

`run(config, workdir)` (fields in configs/simulate.py):

  1. Loads a routing trace: a `.npz` `RoutingTrace`, a synthetic one drawn
     with the model preset's L/E/K, or "record:default" (the shipped model
     recorded on real-text prompts).
  2. Replays it (`wisp_jax.sim.replay`) for every policy, MIN included, at
     every capacity of the config and every slot count a budget allows.
  3. For every device budget predicts decode tokens/s (`wisp_jax.sim.cost`)
     of the four expert modes, over the trace's decode steps:
       resident        fits if all weights + KV reserve + workspace do.
       static_offload  all L x E experts cross PCIe every step; fits if
                       dense + KV + workspace + one layer's E experts do.
       transient       the needed experts of every step; fits if dense + KV
                       + workspace + min(E, max batch x K) experts do.
       paged           the largest uniform slot count S the budget allows
                       after dense weights, KV reserve and workspace (S <= E,
                       S >= K to fit); copies are the replay's loads at S.
     KV reserve = max decode batch of the trace x `context_len` tokens.
  4. Writes `summary.json`, `config.json`, `metrics.jsonl` (one line per
     replay and per budget) and two plots: `hit_rate.png` (hit rate vs
     slots per layer, per policy) and `tokens_per_s.png` (vs budget, per
     mode).

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

from wisp_jax.runs import common
from wisp_jax.models.config import MoEConfig, get_config as get_preset
from wisp_jax.paging.policies import get_policy
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
               batch: np.ndarray, needed: np.ndarray):
    self.model, self.profile, self.context_len = model, profile, context_len
    self.batch, self.needed = batch, needed
    self._cache: dict[tuple[int, int, int], float] = {}

  def tokens_per_s(self, moved: np.ndarray) -> float:
    """Decode tokens / total predicted time, with `moved` experts per step."""
    rows = np.stack([self.batch, self.needed, moved], axis=1)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    seconds = np.empty(len(unique))
    for i, (b, n, m) in enumerate(unique.tolist()):
      if (b, n, m) not in self._cache:
        self._cache[(b, n, m)] = cost.step_cost(
            self.model, self.profile, batch=b, context_len=self.context_len,
            mode="paged", misses=m, needed_experts=n).total_s
      seconds[i] = self._cache[(b, n, m)]
    total = float(seconds[inverse.reshape(-1)].sum())
    return float(self.batch.sum()) / total if total > 0 else 0.0


def _capacities(config, model: MoEConfig) -> list[int]:
  caps = [int(c) for c in config.capacities]
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
                 workspace: int, max_batch: int) -> dict[str, Any]:
  """Which modes fit in `budget` bytes, and the paged slot count."""
  dense, one = cost.dense_bytes(model), cost.expert_bytes(model)
  base = dense + kv_reserve + workspace
  slots = max((budget - base) // (model.num_layers * one), 0)
  return {
      "resident": cost.model_bytes(model) + kv_reserve + workspace <= budget,
      "static_offload": base + model.num_experts * one <= budget,
      "transient": base + min(model.num_experts,
                              max_batch * model.top_k) * one <= budget,
      "paged": slots >= model.top_k,
      "slots_per_layer": int(min(slots, model.num_experts)),
  }


def _replay_all(trace: RoutingTrace, policies: list[str],
                all_options: dict[str, Any], capacities: list[int],
                batching: str, metrics
                ) -> tuple[dict[str, dict[int, replay.ReplayResult]],
                           dict[str, float]]:
  """Replays every policy at every capacity; one metrics line each."""
  results, seconds_per_policy = {}, {}
  for name in policies:
    options = _as_dict(all_options.get(name))
    results[name] = {}
    start = time.perf_counter()
    for capacity in capacities:
      t0 = time.perf_counter()
      r = replay.replay(trace, name, capacity, policy_options=options,
                        batching=batching)
      seconds = time.perf_counter() - t0
      results[name][capacity] = r
      metrics.write(json.dumps({
          "kind": "replay", "policy": name, "capacity": capacity,
          "hit_rate": r.hit_rate, "hits": int(r.hits.sum()),
          "misses": int(r.misses.sum()), "loads": int(r.loads.sum()),
          "seconds": seconds,
          "events_per_s": trace.num_events / max(seconds, 1e-9)}) + "\n")
    seconds_per_policy[name] = time.perf_counter() - start
  return results, seconds_per_policy


def _modes(model: MoEConfig, plan: dict[str, Any], timer: "_Timer",
           results: dict[str, dict[int, replay.ReplayResult]],
           timed: np.ndarray, paged_policy: str) -> dict[str, Any]:
  """Speed and traffic of each mode under one budget's `plan`."""
  one = cost.expert_bytes(model)
  tokens = float(timer.batch.sum())

  def traffic(moved):
    return {"bytes_per_token": float(moved.sum()) * one / tokens,
            "bytes_per_pass": float(moved.mean()) * one}

  needed = timer.needed
  modes = {}
  for mode, moved in (
      ("resident", np.zeros_like(needed)),
      ("static_offload", np.full_like(needed,
                                      model.num_layers * model.num_experts)),
      ("transient", needed)):
    modes[mode] = {"fits": plan[mode], "tokens_per_s": (
        timer.tokens_per_s(moved) if plan[mode] else None), **traffic(moved)}
  slots = plan["slots_per_layer"]
  paged = {"fits": plan["paged"], "slots_per_layer": slots,
           "tokens_per_s": None, "policies": {}}
  if plan["paged"]:
    for name, by_capacity in results.items():
      r = by_capacity[slots]
      moved = r.step_loads.sum(axis=1)[timed]
      paged["policies"][name] = {"hit_rate": r.hit_rate,
                                 "tokens_per_s": timer.tokens_per_s(moved),
                                 **traffic(moved)}
    paged.update({key: paged["policies"][paged_policy][key] for key in (
        "tokens_per_s", "hit_rate", "bytes_per_token", "bytes_per_pass")})
  modes["paged"] = paged
  return modes


def _as_dict(value) -> dict[str, Any]:
  """A plain dict from a ConfigDict, a dict or None."""
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the study; returns the contents of `summary.json`."""
  workdir = common.start(workdir, config)
  preset = get_preset(config.model)
  profile = get_profile(config.hardware if isinstance(config.hardware, str)
                        else dict(config.hardware))
  policies = list(config.policies)
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
  budgets = [int(b) for b in config.budget_bytes] or [profile.memory_bytes]
  if min(budgets) <= 0:
    raise ValueError(f"budget_bytes must be positive, got {budgets}.")

  trace = load_trace(config, preset)
  model, notes = model_for_trace(preset, trace)
  capacities = _capacities(config, model)
  timed = decode_steps(trace, config.batching)
  ordinals = replay.step_ordinals(trace, config.batching)
  batch = np.bincount(ordinals, minlength=timed.size)[timed]  # [S_decode]
  if batch.size == 0:
    raise ValueError(f"trace {trace.source!r} has no decode step to time.")
  max_batch = int(batch.max())
  kv_reserve = (max_batch * config.context_len
                * cost.kv_bytes_per_token(model))
  plans = [_budget_plan(model, b, kv_reserve, config.workspace_bytes,
                        max_batch) for b in budgets]
  replayed = sorted(set(capacities) | {p["slots_per_layer"] for p in plans
                                       if p["paged"]})

  one = cost.expert_bytes(model)
  with open(common.metrics_path(workdir), "w") as metrics:
    results, replay_seconds = _replay_all(trace, policies, all_options,
                                          replayed, config.batching, metrics)
    any_result = results[policies[0]][replayed[0]]
    needed = (any_result.step_hits + any_result.step_misses).sum(axis=1)
    timer = _Timer(model, profile, config.context_len, batch, needed[timed])
    budget_rows = []
    for budget, plan in zip(budgets, plans):
      row = {"budget_bytes": budget, "budget_gib": budget / 2**30,
             "kv_reserve_bytes": kv_reserve,
             "modes": _modes(model, plan, timer, results, timed,
                             config.paged_policy)}
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
                "expert_bytes": one, "dense_bytes": cost.dense_bytes(model),
                "model_bytes": cost.model_bytes(model),
                "all_experts_bytes_per_pass": cost.all_experts_bytes(model)},
      "hardware": {"name": profile.name,
                   "h2d_bytes_per_s": profile.h2d_bytes_per_s,
                   "h2d_source": profile.h2d_source},
      "context_len": config.context_len, "notes": notes,
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
  common.finish(workdir, summary)
  _plot(summary, workdir, config.paged_policy)
  return summary


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
  for name, rates in summary["hit_rate"].items():
    ax.plot(caps, rates, marker="o", ls="--" if name == "min" else "-",
            label=name.upper() if name == "min" else name)
  t = summary["trace"]
  ax.set(xlabel="slots per layer", ylabel="hit rate", ylim=(0, 1.02))
  ax.set_title(f"{t['model'] or 'imported'} trace, {t['num_events']:,} "
               f"events, {t['batching']} batching", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "hit_rate.png", dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  budgets = [row["budget_bytes"] for row in summary["budgets"]]
  unit, scale = ("GiB", 2**30) if max(budgets) >= 2**30 else ("MiB", 2**20)
  gib = [b / scale for b in budgets]
  for mode in ("resident", "static_offload", "transient", "paged"):
    values = [row["modes"][mode]["tokens_per_s"] for row in
              summary["budgets"]]
    label = f"paged ({paged_policy})" if mode == "paged" else mode
    ax.plot(gib, [np.nan if v is None else v for v in values], marker="o",
            label=label)
  bound = [row["modes"]["paged"]["policies"].get("min", {}).get(
      "tokens_per_s") for row in summary["budgets"]]
  if any(v is not None for v in bound):
    ax.plot(gib, [np.nan if v is None else v for v in bound], ls="--",
            color="0.4", label="paged (MIN bound)")
  ax.set(xlabel=f"device budget ({unit})", ylabel="predicted decode tokens/s",
         title=f"{summary['model']['preset']} on {summary['hardware']['name']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "tokens_per_s.png", dpi=120)
  plt.close(fig)
