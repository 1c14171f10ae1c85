"""Online controller vs fixed splits on a phase-changing workload.

`run(config, workdir)`; see configs/online.py. Serves the phases back to
back on one engine per configuration: fixed uniform splits (KV = what the
budget leaves), the step-curve controller and the MV controller (both start
from `controller.initial_slots`). Every configuration runs twice: a warm-up
run compiles every step it needs (controllers decide from step-indexed
observations, so the timed run repeats the same resizes), then the timed
run. Throughput is modeled: each executed step priced by `sim.cost` on
`config.hardware`; CPU wall time is reported too. Writes to `workdir`:
`config.json`, `metrics.jsonl` (one line per step of every timed run,
tagged with configuration and phase), `summary.json` (throughput per phase
and overall, the best fixed split, the controllers' ratios to it, resizes)
and `split_over_time.png`.
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

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.serving import batch_step
from wisp_jax.serving import controller as ctl
from wisp_jax.runs import serve
from wisp_jax.serving import request_stream
from wisp_jax.serving.budget import DeviceBudget, Split
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.models.config import MoEConfig
from wisp_jax.sim import cost
from wisp_jax.sim.hardware import get_profile

MIB = 2**20


def phase_configs(config) -> list[ml_collections.ConfigDict]:
  """`config.phases` (a tuple of dicts) as ConfigDicts, in order."""
  return [ml_collections.ConfigDict(dict(p)) for p in config.phases]


def rule_names(config) -> tuple[str, ...]:
  """`config.controller.rules`: a comma-separated string or a tuple."""
  return reports.split_names(config.controller.rules)


def make_phases(config, vocab_size: int) -> list[list[Request]]:
  """The requests of every phase (stdlib-text prompts, Poisson arrivals)."""
  phases = []
  for p in phase_configs(config):
    requests = request_stream.synthetic_workload(
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


def modeled_step_s(record, config: MoEConfig, hardware,
                   bytes_per_param: int) -> float:
  """Seconds `sim.cost` gives an engine step on `hardware`: its prefill
  passes (equal lengths assumed), its decode pass (the rows' mean context)
  and the expert copies it made (not overlapped)."""
  total = 0.0

  def pass_s(phase, batch, context):
    return cost.step_cost(config, hardware, batch=batch,
                          context_len=max(int(round(context)), 1),
                          mode="paged", phase=phase, misses=0,
                          bytes_per_param=bytes_per_param).total_s

  if record.prefills:
    total += record.prefills * pass_s(
        "prefill", 1, record.prefill_tokens / record.prefills)
  if record.batch_size:
    total += pass_s("decode", record.batch_size,
                    record.decode_context_tokens / record.batch_size)
  one_expert = cost.expert_bytes(config, bytes_per_param)
  return total + record.pager_loads * one_expert / (
      get_profile(hardware).h2d_bytes_per_s)


def make_rule(name: str, config, model, budget, hardware):
  """The controller rule `name` with `config.controller`'s settings."""
  cc = config.controller
  if name == "step_curve":
    return ctl.StepCurveRule(budget, cc.headroom, cc.dead_zone, cc.kv_granule)
  if name == "mv":
    return ctl.MVRule(budget, model.config, hardware, config.engine.max_batch,
                      cc.mv_dead_zone, cc.curve_weight, cc.memory_windows,
                      kv_granule=cc.kv_granule, uniform=cc.mv_uniform,
                      kv_model=cc.mv_kv_model,
                      price_moves=cc.mv_price_moves)
  raise ValueError(f"unknown controller rule {name!r}; use step_curve or mv.")


def make_engine(model, config, budget: DeviceBudget, split: Split,
                **kwargs) -> Engine:
  """The engine of `config.engine` at `split`, with slot rows for any
  split the budget allows (`kwargs`: e.g. the `clock`)."""
  e = config.engine
  return Engine(model, budget, split.slots_per_layer, split.kv_blocks,
                e.block_size, e.max_batch, policy=e.policy,
                min_prefill_bucket=e.min_prefill_bucket,
                num_slots=ctl.max_slots_per_layer(budget, uniform=False),
                **kwargs)


def rule_window(config, rule) -> int:
  """Steps between `rule`'s decisions (`config.controller`)."""
  cc = config.controller
  return cc.mv_window if isinstance(rule, ctl.MVRule) else cc.window


def serve_phases(model, config, budget: DeviceBudget, phases, split: Split,
                 rule=None) -> dict[str, Any]:
  """Serves the phases back to back; returns records, results, history."""
  engine = make_engine(model, config, budget, split)
  control = (ctl.Controller(engine, rule, rule_window(config, rule),
                            config.controller.barrier) if rule else None)
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


def _tally(run: dict, phase_names, step_s) -> dict[str, Any]:
  """Tokens and seconds per phase and overall: modeled (`step_s(record)`
  summed over steps) and measured (CPU wall time, controller included)."""
  out, totals = {}, np.zeros(4)
  for name, (lo, hi, wall), results in zip(phase_names, run["bounds"],
                                           run["results"]):
    records = run["records"][lo:hi]
    tokens = sum(r.batch_size + r.prefills for r in records)
    assert tokens == sum(len(r.tokens) for r in results)
    loads = sum(r.pager_loads for r in records)
    modeled = sum(step_s(r) for r in records)
    out[name] = {"tokens": tokens, "steps": len(records),
                 "modeled_s": modeled, "cpu_wall_s": wall,
                 "expert_loads": loads, "tokens_per_s": tokens / modeled,
                 "cpu_tokens_per_s": tokens / wall}
    totals += (tokens, modeled, wall, loads)
  tokens, modeled, wall, loads = totals
  out["overall"] = {"tokens": int(tokens), "modeled_s": modeled,
                    "cpu_wall_s": wall, "expert_loads": int(loads),
                    "tokens_per_s": tokens / modeled,
                    "cpu_tokens_per_s": tokens / wall}
  return out


def _timeline(run: dict) -> list[dict]:
  """The split at the first step and at every change, and the last step."""
  points, last = [], None
  for r in run["records"]:
    split = (r.slots_per_layer, r.kv_blocks)
    if split != last:
      points.append({"step": r.step, "slots_per_layer": list(split[0]),
                     "kv_blocks": split[1]})
      last = split
  if run["records"]:
    r = run["records"][-1]
    points.append({"step": r.step, "slots_per_layer": list(r.slots_per_layer),
                   "kv_blocks": r.kv_blocks})
  return points


def _plot(path: pathlib.Path, summary: dict, budget: str) -> None:
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
  axes[0].set_title(reports.title(
      "split of device memory over time (" + " then ".join(summary["phases"])
      + " phase)", model=summary["model"],
      hardware=f"time modeled on {summary['hardware']['name']}",
      budget=budget), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _same_tokens(a: dict, b: dict) -> bool:
  return all(np.array_equal(x.tokens, y.tokens)
             for pa, pb in zip(a["results"], b["results"])
             for x, y in zip(pa, pb))


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Runs the comparison; returns the contents of summary.json (prints as
  a table of modeled tokens/s per phase)."""
  reports.start_logging()
  out = common.start(workdir, config)
  model, origin = serve.load_model(config)
  c = model.config
  budget = make_budget(config, model)
  phases = make_phases(config, c.vocab_size)
  names = [p.name for p in phase_configs(config)]
  rules = rule_names(config)
  hardware = get_profile(config.hardware)
  bytes_per_param = budget.footprint.expert_bytes // c.expert_params
  logging.info("model %s (%s); budget %d bytes (free %d): expert %d bytes, "
               "KV block %d bytes; phases %s; time modeled on %s", c.name,
               origin, budget.total_bytes, budget.free_bytes,
               budget.footprint.expert_bytes, budget.footprint.block_bytes,
               {n: len(p) for n, p in zip(names, phases)}, hardware.name)
  fixed = {f"fixed-{s}": Split.make(s, budget.max_kv_blocks(s),
                                    c.num_layers)
           for s in config.fixed_slots}
  for split in fixed.values():
    budget.check(split)
  start = config.controller.initial_slots
  initial = Split.make(start, budget.max_kv_blocks(start), c.num_layers)
  configurations = [(n, "fixed", s, None) for n, s in fixed.items()] + [
      (n, "controller", initial, n) for n in rules]
  runs, traces_before_timed = {}, 0
  # A warm-up pass compiles every step; the timed pass repeats it.
  for timed in (False, True) if config.warmup else (True,):
    traces_before_timed = sum(batch_step.TRACE_COUNTS.values())
    for name, kind, split, rule in configurations:
      if rule is not None:
        rule = make_rule(rule, config, model, budget, hardware)
      result = serve_phases(model, config, budget, phases, split, rule)
      runs[name] = (kind, split, result)
      logging.info("%s %s: %d resizes, CPU seconds %s",
                   "timed" if timed else "warm-up", name,
                   len(result["history"][1:]),
                   {n: round(b[2], 2) for n, b in zip(names,
                                                      result["bounds"])})
  new_traces = sum(batch_step.TRACE_COUNTS.values()) - traces_before_timed

  def step_s(record):
    return modeled_step_s(record, c, hardware, bytes_per_param)

  reference = next(iter(runs.values()))[2]
  summary_runs = {}
  with open(common.metrics_path(out), "w") as metrics:
    for name, (kind, split, result) in runs.items():
      summary_runs[name] = {
          "kind": kind, "initial_split": {
              "slots_per_layer": list(split.slots_per_layer),
              "kv_blocks": split.kv_blocks},
          **_tally(result, names, step_s), "resizes": result["history"][1:],
          "preemptions": result["preemptions"],
          "hit_rate": result["pager"]["hit_rate"],
          "same_tokens_as_first_run": _same_tokens(result, reference),
          "timeline": _timeline(result),
          "phase_starts": [result["records"][lo].step if lo < hi else None
                           for lo, hi, _ in result["bounds"]]}
      for phase, (lo, hi, _) in zip(names, result["bounds"]):
        for record in result["records"][lo:hi]:
          metrics.write(json.dumps({"run": name, "phase": phase,
                                    "modeled_step_s": step_s(record),
                                    **record.to_json()}) + "\n")

  fixed_names = list(fixed)
  comparison = {}
  for metric in ("tokens_per_s", "cpu_tokens_per_s"):
    def best(phase, metric=metric):
      return max(fixed_names, key=lambda n: summary_runs[n][phase][metric])
    top = best("overall")
    comparison[metric] = {
        "best_fixed": top,
        "best_fixed_per_phase": {p: best(p) for p in names},
        "controller_over_best_fixed": {
            n: summary_runs[n]["overall"][metric] /
               summary_runs[top]["overall"][metric]
            for n in rules},
        "controller_over_best_fixed_per_phase": {
            n: {p: summary_runs[n][p][metric] /
                   summary_runs[best(p)][p][metric] for p in names}
            for n in rules}}
  summary = {"model": c.name, "model_origin": origin,
             "budget": {"total_bytes": budget.total_bytes,
                        "free_bytes": budget.free_bytes,
                        "expert_bytes": budget.footprint.expert_bytes,
                        "block_bytes": budget.footprint.block_bytes},
             "hardware": dataclasses.asdict(hardware), "phases": names,
             "comparison": comparison,
             "new_traces_in_timed_runs": new_traces, "runs": summary_runs}
  common.finish(out, summary)
  _plot(out / "split_over_time.png", summary,
        reports.format_bytes(budget.free_bytes) + " for slots and KV")
  return reports.Report(summary, table(summary))


def table(summary: dict[str, Any]) -> str:
  """Modeled tokens/s per phase and overall of every configuration."""
  names = summary["phases"]
  rows = [[name] + [r[p]["tokens_per_s"] for p in names] +
          [r["overall"]["tokens_per_s"], r["overall"]["cpu_tokens_per_s"],
           len(r["resizes"]), r["preemptions"], r["hit_rate"]]
          for name, r in summary["runs"].items()]
  head = (["configuration"] + [f"{p} tok/s" for p in names] +
          ["overall tok/s", "CPU tok/s", "resizes", "preemptions",
           "hit rate"])
  best = summary["comparison"]["tokens_per_s"]
  ratios = ", ".join(f"{n} {v:.3f}x" for n, v in
                     best["controller_over_best_fixed"].items())
  return (reports.text_table(head, rows) +
          f"\nbest fixed split: {best['best_fixed']}; controllers over it "
          f"(modeled on {summary['hardware']['name']}): {ratios}")
