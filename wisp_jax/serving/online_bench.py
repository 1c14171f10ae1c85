"""Online controller vs fixed splits on a phase-changing workload.

`run(config, workdir)`; see configs/online.py. Serves the phases back to
back on one engine per configuration: fixed uniform splits (KV = what the
budget leaves), the step-curve controller and the MV controller (both start
from `controller.initial_slots`). Every configuration runs twice: a warm-up
run compiles every step it needs (controllers decide from step-indexed
observations, so the timed run repeats the same resizes), then the timed
run. Writes to `workdir`: `config.json`, `metrics.jsonl` (one line per step
of every timed run, tagged with the configuration and phase),
`summary.json` (throughput per phase and overall, measured and modeled; the
best fixed split; resizes) and `split_over_time.png`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from absl import logging

from wisp_jax.serving import batch_step
from wisp_jax.serving import controller as ctl
from wisp_jax.serving import serve
from wisp_jax.serving import workload as workload_lib
from wisp_jax.serving.budget import DeviceBudget, Split
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.sim import cost

MIB = 2**20


def make_phases(config, vocab_size: int) -> list[list[Request]]:
  """The requests of every phase (stdlib-text prompts, Poisson arrivals)."""
  phases = []
  for p in config.phases:
    requests = workload_lib.synthetic_workload(
        p.num_requests, (p.prompt_len_min, p.prompt_len_max),
        (p.max_new_tokens_min, p.max_new_tokens_max), "poisson", p.rate,
        vocab_size, 0.0, p.seed)
    phases.append([dataclasses.replace(r, request_id=f"{p.name}-{i}")
                   for i, r in enumerate(requests)])
  return phases


def make_budget(config, model) -> DeviceBudget:
  """Dense + workspace + `budget.pageable_mib`, bound to the model."""
  e, b = config.engine, config.budget
  bound = DeviceBudget(1).for_model(model, e.block_size)
  total = (bound.footprint.dense_bytes + int(b.workspace_mib * MIB) +
           int(b.pageable_mib * MIB))
  return DeviceBudget(total, int(b.workspace_mib * MIB), bound.footprint)


def calibrate(model, records: list[dict], transfer_s: float,
              budget: DeviceBudget) -> dict[str, Any]:
  """A `sim.hardware` profile matching the measured steps of a run: the
  step overhead is the median decode step, the FLOP/s those of prefill,
  the host link moves one expert in `transfer_s`."""
  c = model.config
  decode = [r["step_s"] for r in records
            if r["prefills"] == 0 and r["batch_size"] > 0]
  overhead = float(np.median(decode))
  per_token = [(r["step_s"] - overhead) / r["prefill_tokens"]
               for r in records if r["prefill_tokens"] >= 64]
  per_token = max(float(np.median(per_token)) if per_token else 1e-4, 1e-7)
  return {"name": "calibrated", "step_overhead_s": overhead,
          "bf16_flops": 2.0 * cost.active_param_count(c) / per_token,
          "hbm_bytes_per_s": 1e13, "memory_bytes": budget.total_bytes,
          "h2d_bytes_per_s": (budget.footprint.expert_bytes /
                              max(transfer_s, 1e-9)),
          "h2d_nominal_bytes_per_s": (budget.footprint.expert_bytes /
                                      max(transfer_s, 1e-9)),
          "h2d_source": f"modeled: {transfer_s * 1e3:g} ms per expert"}


def _rule(name: str, config, model, budget, hardware):
  cc = config.controller
  if name == "step_curve":
    return ctl.StepCurveRule(budget, cc.headroom, cc.dead_zone, cc.kv_granule)
  if name == "mv":
    return ctl.MVRule(budget, model.config, hardware, config.engine.max_batch,
                      cc.mv_dead_zone, cc.curve_weight,
                      kv_granule=cc.kv_granule)
  raise ValueError(f"unknown controller rule {name!r}; use step_curve or mv.")


def serve_phases(model, config, budget: DeviceBudget, phases, split: Split,
                 rule=None) -> dict[str, Any]:
  """Serves the phases back to back; returns records, results, history."""
  e = config.engine
  engine = Engine(model, budget, split.slots_per_layer, split.kv_blocks,
                  e.block_size, e.max_batch, policy=e.policy,
                  min_prefill_bucket=e.min_prefill_bucket,
                  num_slots=ctl.max_slots_per_layer(budget, uniform=False))
  cc = config.controller
  window = cc.mv_window if isinstance(rule, ctl.MVRule) else cc.window
  control = (ctl.Controller(engine, rule, window, cc.barrier) if rule
             else None)
  records, results, bounds = [], [], []
  for phase in phases:
    first = len(records)
    started = time.perf_counter()

    def on_step(record):
      records.append(record)
      if control is not None:
        control.on_step(record)

    results.append(engine.run(phase, on_step))
    bounds.append((first, len(records), time.perf_counter() - started))
  engine.close()
  return {"records": records, "results": results, "bounds": bounds,
          "history": control.history if control else [],
          "pager": engine.expert_stats(),
          "preemptions": engine.num_preemptions}


def _tally(run: dict, phase_names, transfer_s: float) -> dict[str, Any]:
  """Tokens and seconds per phase and overall (measured and modeled)."""
  out = {}
  resize_s = {}
  for entry in run["history"][1:]:
    resize_s[entry["step"] - 1] = entry["seconds"]
  totals = np.zeros(4)
  for name, (lo, hi, wall), results in zip(phase_names, run["bounds"],
                                           run["results"]):
    recs = run["records"][lo:hi]
    tokens = sum(r["batch_size"] + r["prefills"] for r in recs)
    assert tokens == sum(len(r.tokens) for r in results)
    loads = sum(r["pager_loads"] for r in recs)
    steps_s = sum(r["step_s"] + resize_s.get(r["step"], 0.0) for r in recs)
    modeled = wall + loads * transfer_s
    out[name] = {"tokens": tokens, "steps": len(recs), "wall_s": wall,
                 "step_s": steps_s, "modeled_s": modeled,
                 "expert_loads": loads, "tokens_per_s": tokens / wall,
                 "modeled_tokens_per_s": tokens / modeled}
    totals += (tokens, wall, modeled, loads)
  out["overall"] = {"tokens": int(totals[0]), "wall_s": totals[1],
                    "modeled_s": totals[2], "expert_loads": int(totals[3]),
                    "tokens_per_s": totals[0] / totals[1],
                    "modeled_tokens_per_s": totals[0] / totals[2]}
  return out


def _timeline(run: dict) -> list[dict]:
  """The split at the first step and at every change, and the last step."""
  points, last = [], None
  for r in run["records"]:
    split = (r["slots_per_layer"], r["kv_blocks"])
    if split != last:
      points.append({"step": r["step"], "slots_per_layer": split[0],
                     "kv_blocks": split[1]})
      last = split
  if run["records"]:
    r = run["records"][-1]
    points.append({"step": r["step"], "slots_per_layer": r["slots_per_layer"],
                   "kv_blocks": r["kv_blocks"]})
  return points


def _plot(path: pathlib.Path, summary: dict) -> None:
  fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
  for name, run in summary["runs"].items():
    line = run["timeline"]
    steps = [p["step"] for p in line]
    controller = run["kind"] == "controller"
    style = (dict(lw=2) if controller else dict(lw=1, ls="--", alpha=0.6))
    for ax, values in ((axes[0], [p["kv_blocks"] for p in line]),
                       (axes[1], [float(np.mean(p["slots_per_layer"]))
                                  for p in line])):
      drawn = ax.step(steps, values, where="post", label=name, **style)
      if controller:  # where the next phase began in this run
        for step in run["phase_starts"][1:]:
          ax.axvline(step, color=drawn[0].get_color(), lw=0.8, ls=":")
  axes[0].set_ylabel("KV blocks")
  axes[1].set_ylabel("expert slots per layer (mean)")
  axes[1].set_xlabel("engine step (dotted: a controller run's next phase)")
  axes[0].legend(fontsize=7, ncol=2)
  axes[0].set_title("Split of device memory over time")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _same_tokens(a: dict, b: dict) -> bool:
  return all(np.array_equal(x.tokens, y.tokens)
             for pa, pb in zip(a["results"], b["results"])
             for x, y in zip(pa, pb))


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Runs the comparison; returns the contents of summary.json."""
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(config.to_json_best_effort(indent=2))
  model, origin = serve.load_model(config)
  c = model.config
  budget = make_budget(config, model)
  phases = make_phases(config, c.vocab_size)
  names = [p.name for p in config.phases]
  transfer_s = config.transfer_ms_per_expert * 1e-3
  logging.info("model %s (%s); budget %d bytes (free %d): expert %d bytes, "
               "KV block %d bytes; phases %s", c.name, origin,
               budget.total_bytes, budget.free_bytes,
               budget.footprint.expert_bytes, budget.footprint.block_bytes,
               {n: len(p) for n, p in zip(names, phases)})
  fixed = {f"fixed-{s}": Split.make(s, budget.max_kv_blocks(s),
                                    c.num_layers)
           for s in config.fixed_slots}
  for split in fixed.values():
    budget.check(split)
  start = config.controller.initial_slots
  initial = Split.make(start, budget.max_kv_blocks(start), c.num_layers)
  # The MV rule's cost model, from a compiled run of the first fixed split.
  first = next(iter(fixed.values()))
  serve_phases(model, config, budget, phases, first)
  hardware = calibrate(model, serve_phases(model, config, budget, phases,
                                           first)["records"],
                       transfer_s, budget)
  logging.info("calibrated cost model: %s", hardware)
  runs, traces_before_timed = {}, None
  # Warm-up pass (compiles every step), then the timed pass.
  for timed in (False, True):
    if timed:
      traces_before_timed = sum(batch_step.TRACE_COUNTS.values())
    for name, split in fixed.items():
      result = serve_phases(model, config, budget, phases, split)
      if timed:
        runs[name] = ("fixed", split, result)
      logging.info("%s %s: %s", "timed" if timed else "warm-up", name,
                   {n: round(b[2], 2) for n, b in zip(names,
                                                      result["bounds"])})
    for rule_name in config.controller.rules:
      rule = _rule(rule_name, config, model, budget, hardware)
      result = serve_phases(model, config, budget, phases, initial, rule)
      if timed:
        runs[rule_name] = ("controller", initial, result)
      logging.info("%s %s: %d resizes, %s", "timed" if timed else "warm-up",
                   rule_name, len(result["history"]) - 1,
                   {n: round(b[2], 2) for n, b in zip(names,
                                                      result["bounds"])})
  new_traces = sum(batch_step.TRACE_COUNTS.values()) - traces_before_timed

  reference = next(iter(runs.values()))[2]
  summary_runs = {}
  metrics = open(out / "metrics.jsonl", "w")
  for name, (kind, split, result) in runs.items():
    tally = _tally(result, names, transfer_s)
    starts = [result["records"][lo]["step"] if lo < hi else None
              for lo, hi, _ in result["bounds"]]
    summary_runs[name] = {
        "kind": kind, "initial_split": {"slots_per_layer": list(
            split.slots_per_layer), "kv_blocks": split.kv_blocks},
        **tally, "resizes": result["history"][1:],
        "preemptions": result["preemptions"],
        "hit_rate": result["pager"]["hit_rate"],
        "same_tokens_as_first_run": _same_tokens(result, reference),
        "timeline": _timeline(result), "phase_starts": starts}
    for i, (lo, hi, _) in enumerate(result["bounds"]):
      for record in result["records"][lo:hi]:
        metrics.write(json.dumps({"run": name, "phase": names[i],
                                  **record}) + "\n")
  metrics.close()

  def best(metric, phase):
    fixed_runs = [n for n, r in summary_runs.items() if r["kind"] == "fixed"]
    return max(fixed_runs, key=lambda n: summary_runs[n][phase][metric])

  comparison = {}
  for metric in ("modeled_tokens_per_s", "tokens_per_s"):
    top = best(metric, "overall")
    comparison[metric] = {
        "best_fixed": top,
        "best_fixed_per_phase": {p: best(metric, p) for p in names},
        "controller_over_best_fixed": {
            n: r["overall"][metric] / summary_runs[top]["overall"][metric]
            for n, r in summary_runs.items() if r["kind"] == "controller"}}
  summary = {"model": c.name, "model_origin": origin,
             "budget": {"total_bytes": budget.total_bytes,
                        "free_bytes": budget.free_bytes,
                        "expert_bytes": budget.footprint.expert_bytes,
                        "block_bytes": budget.footprint.block_bytes},
             "transfer_s_per_expert": transfer_s, "hardware": hardware,
             "phases": names, "comparison": comparison,
             "new_traces_in_timed_runs": new_traces, "runs": summary_runs}
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  _plot(out / "split_over_time.png", summary)
  for name, r in summary_runs.items():
    logging.info("%-12s %s | overall %.1f tok/s modeled, %.1f measured; "
                 "%d resizes, %d preemptions, hit rate %.3f", name,
                 " ".join(f"{p} {r[p]['modeled_tokens_per_s']:.1f}"
                          for p in names),
                 r["overall"]["modeled_tokens_per_s"],
                 r["overall"]["tokens_per_s"], len(r["resizes"]),
                 r["preemptions"], r["hit_rate"])
  logging.info("comparison: %s", comparison)
  return summary
