"""What prefetching is worth: eviction policies x predictors x hardware.

`run(config, workdir)` (fields in configs/prefetch.py). For every workload
(a routing trace and the preset whose byte sizes it is timed with), every
capacity (slots per layer) and every configuration (an eviction policy,
optionally with a predictor's prefetch on top), it replays the trace
(`wisp_jax.sim.prefetch`: the live pager's planning) and times it on the
per-layer timeline (`wisp_jax.sim.timeline`) of every hardware profile.

Workloads, all held out from the tuning of the policies' parameters:
  * synthetic traces with each preset's L/E/K (`kinds`, seed `eval_seed`),
    decoded at every batch size, and a prefill workload (`prefill`: each
    step is one prompt of `prompt_len` tokens). Besides the generators of
    `wisp_jax.traces.synthetic`, kind `shift` is a sticky trace whose
    expert popularity is drawn anew every `shift_every` tokens (a workload
    that changes phase; the generators' popularity never changes);
  * the shipped default model's routing on real-text prompts, recorded
    live with the gate lookahead (`record_lookahead`), timed with the
    sizes of `record.preset` (same E and K; the trace's L).

Configurations: LRU and the history policies, each alone and with every
predictor (cooccur, temporal, gate where recorded, and the noisy oracle at
each of `oracle_accuracies`), MIN, and MIN with a perfect next-layer
prefetch (the bound).

`config.mode = "tune"` instead replays the tuning traces (synthetic seed
`tune_seed`, the default model on its first `tune_prompts` prompts) for
each policy and half-life of `tune.half_lives`, and reports the fraction
of the LRU-to-MIN hit-rate gap each closes: how the defaults of
`wisp_jax.paging.policies` were chosen.

Writes `config.json`, `metrics.jsonl` (one line per replay and profile),
`summary.json` (`rows`, `headline`) and, in study mode, the plots
`accuracy_<preset>.png` (tokens/s vs prefetch precision) and
`bytes_<preset>.png` (bytes moved per token vs hit rate).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.models.config import MoEConfig, get_config as get_preset
from wisp_jax.runs import common
from wisp_jax.runs.simulate import GENERATORS, decode_steps, model_for_trace
from wisp_jax.sim import cost, timeline
from wisp_jax.sim import prefetch as sim_prefetch
from wisp_jax.traces.trace import PREFILL, RoutingTrace


@dataclasses.dataclass(frozen=True)
class Workload:
  """A trace and the model sizes it is timed with."""
  name: str
  kind: str
  batch: int
  phase: str  # "decode" or "prefill"
  trace: RoutingTrace
  model: MoEConfig


def _dict(value) -> dict[str, Any]:
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def as_prefill(trace: RoutingTrace) -> RoutingTrace:
  """Each request's tokens as one prefill step."""
  _, request = np.unique(trace.request, return_inverse=True)
  order = np.lexsort((trace.position, request))
  t = trace.select(order)
  return dataclasses.replace(t, step=request[order],
                             phase=np.full(t.num_tokens, PREFILL))


def concatenate(traces: list[RoutingTrace], source: str) -> RoutingTrace:
  """Traces one after another (steps offset), lookahead kept."""
  steps, offset = [], 0
  for t in traces:
    steps.append(t.step - t.step.min() + offset)
    offset = int(steps[-1].max()) + 1
  cat = lambda name: np.concatenate([getattr(t, name) for t in traces])
  look = (cat("lookahead_ids") if all(t.lookahead_ids is not None
                                      for t in traces) else None)
  first = traces[0]
  return RoutingTrace(step=np.concatenate(steps), request=cat("request"),
                      phase=cat("phase"), position=cat("position"),
                      ids=cat("ids"), weights=cat("weights"),
                      num_experts=first.num_experts, model=first.model,
                      source=source, lookahead_ids=look)


def record_lookahead(model, prompts, max_new_tokens: int, batch_size: int,
                     source: str = "wisp_jax.runs.prefetch.record_lookahead"
                     ) -> RoutingTrace:
  """`serving.record.record` with the gate lookahead: waves of equal-length
  prompts through a paged source holding all E experts (outputs and
  routing are those of the resident model) that records the lookahead."""
  from wisp_jax.paging import bank as bank_lib  # Heavy, load lazily.
  from wisp_jax.serving.generate import generate
  from wisp_jax.traces.trace import from_generate
  c = model.config
  bank = bank_lib.make_bank(model.experts.weights())
  waves = []
  for first in range(0, len(prompts), batch_size):
    rows = [np.asarray(p, np.int64) for p in prompts[first:first + batch_size]]
    shortest = min(row.size for row in rows)
    out = generate(model, [row[:shortest] for row in rows], max_new_tokens,
                   experts="paged", slots_per_layer=c.num_experts, bank=bank,
                   prefetch="gate", prefetch_options={"limit": 0},
                   record_routing=True)
    waves.append(from_generate(out, c, np.arange(first, first + len(rows)),
                               source))
  return concatenate(waves, source)


def _recorded(config, prompts_range: tuple[int, int], batch: int
              ) -> RoutingTrace:
  from wisp_jax.models.default import load_default  # Heavy, load lazily.
  from wisp_jax.serving.record import real_text_prompts
  r = config.record
  prompts = real_text_prompts(prompts_range[1], r.max_prompt_bytes)
  return record_lookahead(load_default(), prompts[prompts_range[0]:],
                          r.max_new_tokens, batch)


def _synthetic(kind: str, geometry, requests: int, tokens: int, batch: int,
               seed: int, config) -> RoutingTrace:
  """A trace of `GENERATORS[kind]`, or of kind `shift` (see the module
  docstring)."""
  s = config.synthetic
  options = _dict(s.options)
  if kind != "shift":
    return GENERATORS[kind](*geometry, requests, tokens, batch, seed=seed,
                            **options.get(kind, {}))
  every = int(s.shift_every)
  segments = [GENERATORS["sticky"](*geometry, requests, min(every, tokens - a),
                                   batch, seed=1000 * seed + i,
                                   **options.get("sticky", {}))
              for i, a in enumerate(range(0, tokens, every))]
  trace = concatenate(segments, f"shift(every={every}, seed={seed})")
  return dataclasses.replace(trace, model="synthetic")


def workloads(config, seed: int, tuning: bool) -> list[Workload]:
  """The workloads of a study (`tuning=False`) or of the tuning."""
  out = []
  s = config.synthetic
  for preset_name in config.presets:
    preset = get_preset(preset_name)
    geometry = (preset.num_layers, preset.num_experts, preset.top_k)
    for kind in config.kinds:
      make = lambda requests, tokens, batch: _synthetic(
          kind, geometry, requests, tokens, batch, seed, config)
      for batch in config.batches:
        trace = make(batch * s.waves, s.tokens_per_request, batch)
        out.append(Workload(f"{preset_name}/{kind}/B{batch}", kind, batch,
                            "decode", trace, preset))
      if not tuning and config.prefill.prompts:
        p = config.prefill
        trace = as_prefill(make(p.prompts, p.prompt_len, 1))
        out.append(Workload(f"{preset_name}/{kind}/prefill{p.prompt_len}",
                            kind, 1, "prefill", trace, preset))
  r = config.record
  if r.enabled:
    preset = get_preset(r.preset)
    span = ((0, r.tune_prompts) if tuning else
            (r.tune_prompts, r.tune_prompts + r.eval_prompts))
    for batch in config.batches:
      trace = _recorded(config, span, batch)
      model, _ = model_for_trace(preset, trace)
      out.append(Workload(f"default-model/B{batch}", "recorded", batch,
                          "decode", trace, model))
  return out


def _capacities(config, model: MoEConfig) -> list[int]:
  caps = {int(np.clip(round(f * model.num_experts), model.top_k,
                      model.num_experts - 1))
          for f in config.capacity_fractions}
  return sorted(caps)


def configurations(config, workload: Workload) -> list[dict[str, Any]]:
  """(policy, predictor, accuracy) of every replay of a workload."""
  out = []
  has_lookahead = workload.trace.lookahead_ids is not None
  for policy in config.policies:
    out.append(dict(policy=policy, predictor="", accuracy=None))
    for predictor in config.predictors:
      if predictor == "gate" and not has_lookahead:
        continue
      if predictor == "oracle":
        out += [dict(policy=policy, predictor="oracle", accuracy=float(a))
                for a in config.oracle_accuracies]
      elif predictor:
        out.append(dict(policy=policy, predictor=predictor, accuracy=None))
  out.append(dict(policy="min", predictor="", accuracy=None))
  out.append(dict(policy="min", predictor="oracle", accuracy=1.0))
  return out


def _policy_options(config, name: str) -> dict[str, Any]:
  return _dict(config.get("policy_options")).get(name, {})


def _cost_bound(model, profile, trace_tokens, needed, copies, prefill,
                context_len, overlap: bool, memo: dict) -> np.ndarray:
  """`[S]` `cost.step_cost` seconds of each step with all copies."""
  out = np.empty(len(trace_tokens))
  for i, key in enumerate(zip(trace_tokens.tolist(), needed.tolist(),
                              copies.tolist(), prefill.tolist())):
    if key not in memo:
      tokens, n, m, pre = key
      memo[key] = cost.step_cost(
          model, profile, batch=1 if pre else tokens,
          context_len=tokens if pre else context_len, mode="paged",
          phase="prefill" if pre else "decode", misses=m,
          needed_experts=n, overlap=overlap).total_s
    out[i] = memo[key]
  return out


def study_workload(config, workload: Workload, metrics) -> list[dict]:
  """Replays and times every configuration at every capacity."""
  trace, model = workload.trace, workload.model
  one = cost.expert_bytes(model)
  prefill = ~decode_steps(trace, "trace")
  timed = ~prefill if workload.phase == "decode" else prefill
  rows = []
  for capacity in _capacities(config, model):
    prepared, results, specs = {}, [], configurations(config, workload)
    for spec in specs:
      key = (spec["predictor"], spec["accuracy"], spec["policy"] ==
             "lrfu_gate", spec["policy"] == "min")
      if key not in prepared:
        prepared[key] = sim_prefetch.inputs(
            trace, spec["predictor"], accuracy=spec["accuracy"] or 1.0,
            seed=config.eval_seed, gates=key[2], hints=key[3])
      results.append(sim_prefetch.replay(
          trace, spec["policy"], capacity, predictor=spec["predictor"],
          policy_options=_policy_options(config, spec["policy"]),
          accuracy=spec["accuracy"] or 1.0, prepared=prepared[key]))
    needed = results[0].row("hits") + results[0].row("misses")  # [S, L]
    tokens = results[0].tokens
    loads = np.stack([r.row("loads") for r in results])
    pref = np.stack([r.row("prefetch") for r in results])
    wait = np.stack([r.row("wait") > 0 for r in results])
    later = np.array([r.target == "next_step" for r in results])
    per_profile = {}
    for profile in config.profiles:
      times = timeline.device_times(model, profile, tokens, needed,
                                    context_len=config.context_len,
                                    prefill=prefill)
      step_s = timeline.simulate(times, loads, pref, wait, later)
      memo_serial, memo_bound = {}, {}
      serial, bound = [], []
      for c in range(len(results)):
        copies = (loads[c] + pref[c]).sum(axis=1)
        args = (model, profile, tokens, needed.sum(axis=1), copies,
                prefill, config.context_len)
        serial.append(_cost_bound(*args, False, memo_serial))
        bound.append(_cost_bound(*args, True, memo_bound))
      per_profile[profile] = (
          timeline.tokens_per_s(step_s, tokens, timed),
          timeline.tokens_per_s(np.stack(serial), tokens, timed),
          timeline.tokens_per_s(np.stack(bound), tokens, timed))
    for c, (spec, r) in enumerate(zip(specs, results)):
      row = {
          "workload": workload.name, "kind": workload.kind,
          "preset": model.name, "batch": workload.batch,
          "phase": workload.phase, "capacity": capacity,
          "expert_budget_bytes": capacity * model.num_layers * one, **spec,
          "hit_rate": r.hit_rate, "demand_loads": int(r.loads.sum()),
          "prefetch_loads": int(r.prefetch_loads.sum()),
          "useful": int(r.useful.sum()), "wasted": int(r.wasted.sum()),
          "bytes_per_token": r.copies * one / max(int(tokens.sum()), 1),
          "precision": r.precision if spec["predictor"] else None,
          "recall": r.recall if spec["predictor"] else None,
          "precision_k": r.precision_k if spec["predictor"] else None,
          "recall_k": r.recall_k if spec["predictor"] else None,
          "tokens_per_s": {p: float(v[0][c]) for p, v in per_profile.items()},
          "tokens_per_s_serial": {p: float(v[1][c])
                                  for p, v in per_profile.items()},
          "tokens_per_s_bound": {p: float(v[2][c])
                                 for p, v in per_profile.items()}}
      rows.append(row)
      metrics.write(json.dumps({"kind": "replay", **row}) + "\n")
  return rows


def _gap_closed(hit, lru, best) -> float | None:
  return (hit - lru) / (best - lru) if best - lru > 1e-12 else None


def tune(config, metrics) -> dict[str, Any]:
  """Hit rates of every policy and half-life on the tuning workloads."""
  candidates = [("lru", {}), ("min", {})]
  candidates += [(name, _policy_options(config, name))
                 for name in config.tune.other_policies]
  candidates += [(name, {"half_life": float(h)})
                 for name in ("lrfu", "lrfu_gate")
                 for h in config.tune.half_lives]
  gaps: dict[str, list[float]] = {}
  by_kind: dict[str, dict[str, list[float]]] = {}
  for workload in workloads(config, config.tune_seed, tuning=True):
    for capacity in _capacities(config, workload.model):
      hits = {}
      for name, options in candidates:
        r = sim_prefetch.replay(workload.trace, name, capacity,
                                policy_options=options)
        label = name + "".join(f":{v:g}" for v in options.values()
                               if name.startswith("lrfu"))
        hits[label] = r.hit_rate
      for label, hit in hits.items():
        gap = _gap_closed(hit, hits["lru"], hits["min"])
        if gap is not None:
          gaps.setdefault(label, []).append(gap)
          by_kind.setdefault(workload.kind, {}).setdefault(label, []).append(
              gap)
      metrics.write(json.dumps({"kind": "tune", "workload": workload.name,
                                "capacity": capacity, "hit_rate": hits})
                    + "\n")
  mean = {label: float(np.mean(v)) for label, v in gaps.items()}
  chosen = {name: max((l for l in mean if l.startswith(name + ":")),
                      key=mean.get) for name in ("lrfu", "lrfu_gate")}
  online = [l for l in mean if l not in ("lru", "min")]
  return {"mean_gap_closed": mean, "chosen": chosen,
          "best_policy": max(online, key=mean.get),
          "mean_gap_closed_by_kind": {
              kind: {label: float(np.mean(v)) for label, v in d.items()}
              for kind, d in by_kind.items()}}


def headline(rows: list[dict], config) -> dict[str, Any]:
  """The numbers the README quotes (see `report`)."""
  by = {}
  for row in rows:
    by[(row["workload"], row["capacity"], row["policy"], row["predictor"],
        row["accuracy"])] = row
  out = {"gap_closed": {}, "prefetch_speedup": {}}
  for policy in config.policies:
    if policy == "lru":
      continue
    gaps = [g for (w, c, p, pred, a), row in by.items()
            if p == policy and not pred and row["phase"] == "decode"
            for g in [_gap_closed(row["hit_rate"],
                                  by[(w, c, "lru", "", None)]["hit_rate"],
                                  by[(w, c, "min", "", None)]["hit_rate"])]
            if g is not None]
    out["gap_closed"][policy] = float(np.mean(gaps)) if gaps else None
  for profile in config.profiles:
    for (w, c, p, pred, a), row in by.items():
      if not pred or (pred == "oracle" and a != 1.0) or p == "min":
        continue
      base = by[(w, c, p, "", None)]["tokens_per_s"][profile]
      key = f"{profile}/B{row['batch']}/{row['phase']}/{pred}"
      out["prefetch_speedup"].setdefault(key, []).append(
          row["tokens_per_s"][profile] / base)
  out["prefetch_speedup"] = {
      k: {"median": float(np.median(v)), "max": float(np.max(v)),
          "min": float(np.min(v))}
      for k, v in sorted(out["prefetch_speedup"].items())}
  return out


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
        ) -> dict[str, Any]:
  """Runs the study (or the tuning); returns the contents of summary.json."""
  for name in config.profiles:
    timeline.get_profile(name)  # unknown names fail before any work
  workdir = common.start(workdir, config)
  with open(common.metrics_path(workdir), "w") as metrics:
    if config.mode == "tune":
      summary = {"mode": "tune", **tune(config, metrics)}
      return common.finish(workdir, summary)
    if config.mode != "study":
      raise ValueError(f"mode must be 'study' or 'tune', got "
                       f"{config.mode!r}.")
    rows = []
    for workload in workloads(config, config.eval_seed, tuning=False):
      logging.info("workload %s (%d steps)", workload.name,
                   workload.trace.num_steps)
      rows += study_workload(config, workload, metrics)
  summary = {"mode": "study", "rows": rows,
             "headline": headline(rows, config)}
  common.finish(workdir, summary)
  plot(rows, config, pathlib.Path(workdir))
  return summary


def report(summary: dict[str, Any], workdir: str) -> None:
  """Logs the headline numbers."""
  if summary["mode"] == "tune":
    logging.info("chosen half-lives %s, best policy %s", summary["chosen"],
                 summary["best_policy"])
    for label, gap in sorted(summary["mean_gap_closed"].items()):
      logging.info("  %-16s closes %6.1f%% of the LRU-to-MIN gap", label,
                   100 * gap)
    return
  h = summary["headline"]
  for policy, gap in h["gap_closed"].items():
    logging.info("%s closes %s of the LRU-to-MIN hit-rate gap", policy,
                 "n/a" if gap is None else f"{100 * gap:.1f}%")
  for key, s in h["prefetch_speedup"].items():
    logging.info("prefetch %-40s x%.3f (min %.3f, max %.3f)", key,
                 s["median"], s["min"], s["max"])
  logging.info("wrote %s/summary.json and plots", workdir)


def plot(rows: list[dict], config, workdir: pathlib.Path) -> None:
  """accuracy_<preset>.png and bytes_<preset>.png (see the module
  docstring)."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  for preset in sorted({r["preset"] for r in rows}):
    mine = [r for r in rows if r["preset"] == preset and
            r["phase"] == "decode" and r["policy"] == config.policies[0]]
    caps = sorted({r["capacity"] for r in mine})
    cap = caps[len(caps) // 2]
    kind = mine[0]["kind"]
    budget = next(r["expert_budget_bytes"] for r in mine
                  if r["capacity"] == cap) / 2**30
    fig, axes = plt.subplots(1, len(config.profiles), squeeze=False,
                             figsize=(4.2 * len(config.profiles), 3.6))
    for ax, profile in zip(axes[0], config.profiles):
      for batch in config.batches:
        sel = [r for r in mine if r["batch"] == batch and r["kind"] == kind
               and r["capacity"] == cap]
        oracle = sorted((r["precision"], r["tokens_per_s"][profile])
                        for r in sel if r["predictor"] == "oracle")
        line, = ax.plot(*zip(*oracle), marker="o", label=f"oracle, B={batch}"
                        ) if oracle else (None,)
        color = line.get_color() if line else None
        for r in sel:
          if r["predictor"] in ("cooccur", "temporal", "gate"):
            ax.plot(r["precision"], r["tokens_per_s"][profile], marker="s",
                    ls="", color=color)
            ax.annotate(r["predictor"], (r["precision"],
                                         r["tokens_per_s"][profile]),
                        fontsize=6)
          if not r["predictor"]:
            ax.axhline(r["tokens_per_s"][profile], color=color, ls=":",
                       lw=1)
      ax.set_yscale("log")
      ax.set(xlabel="prefetch precision", ylabel="modelled decode tokens/s",
             xlim=(0, 1.02))
      ax.set_title(f"{preset} on {profile}, {cap} slots/layer "
                   f"({budget:.3g} GiB experts)", fontsize=8)
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=6)
    fig.suptitle(f"{kind} trace, {config.policies[0]}; dotted: no prefetch",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(workdir / f"accuracy_{preset}.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sel = [r for r in rows if r["preset"] == preset and
           r["phase"] == "decode" and r["capacity"] == cap and
           r["batch"] == config.batches[0] and r["kind"] == kind]
    for r in sel:
      label = r["policy"] + (f"+{r['predictor']}" if r["predictor"] else "")
      if r["accuracy"] not in (None, 1.0):
        continue
      ax.plot(r["hit_rate"], r["bytes_per_token"], marker="o", ls="")
      ax.annotate(label, (r["hit_rate"], r["bytes_per_token"]), fontsize=6)
    ax.set_yscale("log")
    ax.set(xlabel="demand hit rate", ylabel="bytes moved per token")
    ax.set_title(f"{preset}, {kind}, B={config.batches[0]}, {cap} slots/layer"
                 f" ({budget:.3g} GiB experts); any hardware", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(workdir / f"bytes_{preset}.png", dpi=110)
    plt.close(fig)
