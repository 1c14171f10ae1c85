"""Online controllers judged out of sample: `run(config, workdir)`.

See configs/online_eval.py. The protocol:

  1. Frozen settings, chosen on the tuning scenario (its phases, its
     seeds) alone: the initial split is the fixed split with the best mean
     throughput there, and each controller's `tuning_grid` settings the
     combination with the best mean throughput there (`tune_settings`);
     the rest are the `online` experiment's `tiny` config. Nothing below
     changes any of them.
  2. Held-out scenarios (other phase mixes and orders, a gradual drift,
     stationary controls), each on arrival seeds the tuning never saw.
     Arrivals are open loop in modelled time: Poisson arrival times in
     seconds, fixed before serving, so a slow configuration sees more
     requests arrive per step (`serve_open_loop`).
  3. Every configuration serves the same requests: each fixed split, each
     controller. Its throughput is tokens / modelled makespan (the clock
     when the last request finished). Each step advances the clock by its
     `sim.cost` price (prefill passes, decode pass, expert copies). What a
     controller adds is priced on the same clock: re-prefills after a
     drain are executed steps; a KV pool rebuild writes the new pool once
     and a slot-row move copies one expert, both at the device's memory
     bandwidth; the decision's own compute is its measured CPU seconds,
     on the critical path (or beside it, "behind"); the CPU seconds of a
     drain and a resize are the engine's, priced by the steps and bytes
     above.
  4. Ratios per seed, controller over: the fixed split chosen on the tuning
     scenario; the best fixed split in hindsight (the best mean over this
     scenario's seeds); and the switching oracle (`ScheduledSwitches`:
     at each phase's first arrival it switches to the fixed split that
     served that phase alone best, paying the same resize costs; its
     bookkeeping is not priced, as it decides nothing). Reported
     as the mean over seeds with a 95% t-interval.
  5. Cost sensitivity: whole reruns (the controllers decide on the changed
     profile too) with the step overhead or the host-to-device bandwidth
     changed, on a subset of scenarios and seeds.

Writes `config.json`, `metrics.jsonl` (one line per run), `summary.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.runs import common
from wisp_jax.runs import online
from wisp_jax.runs import reports
from wisp_jax.runs import serve
from wisp_jax.serving import controller as ctl
from wisp_jax.serving import request_stream
from wisp_jax.serving.budget import DeviceBudget, Split
from wisp_jax.sim.hardware import HardwareProfile, get_profile

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262,
         2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101,
         2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
         2.048, 2.045, 2.042)


def mean_interval(values) -> dict[str, float]:
  """Mean and 95% t-interval of `values` (the interval is the mean alone
  for one value)."""
  x = np.asarray(list(values), np.float64)
  if x.size == 0:
    raise ValueError("mean_interval needs at least one value.")
  mean = float(x.mean())
  if x.size == 1:
    return {"mean": mean, "low": mean, "high": mean, "n": 1}
  t = _T975[min(x.size - 1, len(_T975)) - 1]
  half = t * float(x.std(ddof=1)) / math.sqrt(x.size)
  return {"mean": mean, "low": mean - half, "high": mean + half,
          "n": int(x.size)}


def scenario_phases(config, spec: str) -> list[ml_collections.ConfigDict]:
  """The phase types named in `spec` ("long,chat"), in order."""
  names = reports.split_names(spec)
  unknown = [n for n in names if n not in config.phase_types]
  if unknown or not names:
    raise ValueError(f"scenario {spec!r}: unknown phase types {unknown}; "
                     f"known: {sorted(config.phase_types)}.")
  return [config.phase_types[n] for n in names]


def phase_seeds(seed: int, num_phases: int) -> tuple[int, ...]:
  """The seeds of a scenario's phases (requests and arrival gaps)."""
  return tuple(seed * 100 + i for i in range(num_phases))


@functools.lru_cache(maxsize=None)
def _phase_requests(num_requests: int, prompt_min: int, prompt_max: int,
                    new_min: int, new_max: int, vocab_size: int, seed: int
                    ) -> tuple:
  """One phase's requests (cached: reading the stdlib prompts is slow, and
  every configuration serves the same ones)."""
  return tuple(request_stream.synthetic_workload(
      num_requests, (prompt_min, prompt_max), (new_min, new_max), "all", 1.0,
      vocab_size, 0.0, seed))


def make_stream(phases, vocab_size: int, seeds: tuple[int, ...],
                arrival_step_s: float) -> list[tuple[Any, float, int]]:
  """(request, arrival second, phase index) of every request, in arrival
  order: Poisson arrivals per phase (phase i drawn from `seeds[i]`); a
  phase's arrivals start where the previous phase's ended."""
  stream, start = [], 0.0
  for index, (p, seed) in enumerate(zip(phases, seeds, strict=True)):
    requests = _phase_requests(p.num_requests, p.prompt_len_min,
                               p.prompt_len_max, p.max_new_tokens_min,
                               p.max_new_tokens_max, vocab_size, seed)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(arrival_step_s / p.rate, size=len(requests))
    times = start + np.cumsum(gaps)
    for i, (request, at) in enumerate(zip(requests, times)):
      request = dataclasses.replace(request, request_id=f"{index}-{p.name}-{i}",
                                    arrival_step=0)
      stream.append((request, float(at), index))
    start = float(times[-1]) if len(times) else start
  return stream


@dataclasses.dataclass
class Clock:
  """The modelled clock the engine reads (seconds)."""
  now: float = 0.0

  def __call__(self) -> float:
    return self.now


def resize_seconds(entry: dict, hardware: HardwareProfile,
                   expert_bytes: int, block_bytes: int) -> float:
  """Device time of one resize: the new KV pool written once (it is
  rebuilt) and every moved slot row copied, at memory bandwidth."""
  kv_bytes = (entry["kv_blocks"] * block_bytes
              if entry["kv_blocks"] != entry["from"]["kv_blocks"] else 0)
  moved = int(np.sum(entry["slots_moved"])) * expert_bytes
  return (kv_bytes + moved) / hardware.hbm_bytes_per_s


class BehindController(ctl.Controller):
  """A controller whose decisions run off the critical path: a window's
  decision starts when the window ends and takes effect (at the barrier)
  once the modelled clock has passed its measured compute time; serving
  goes on meanwhile, and the next window starts after it took effect."""

  def __init__(self, engine, rule, window: int, barrier: str, clock):
    super().__init__(engine, rule, window, barrier)
    self.clock = clock
    self.decision_s = 0.0
    self._ready: tuple[float, Split] | None = None

  def on_step(self, record) -> None:
    engine = self.engine
    if self.at_barrier():
      return
    if self._ready is not None:
      at, chosen = self._ready
      if self.clock() >= at:
        self._ready = None
        self.apply(chosen)
      return
    self._observed.append(ctl.observe(engine, record, self.routing))
    if len(self._observed) < self.window:
      return
    started = time.perf_counter()
    chosen = self.rule.decide(engine.split, self._observed)
    spent = time.perf_counter() - started
    self.decisions += 1
    self._observed = []
    self.decision_s += spent
    self._ready = (self.clock() + spent, chosen)


class _NoRule:
  """The rule of `ScheduledSwitches`: never asked."""
  name = "schedule"
  needs_routing = False

  def decide(self, current, window):
    return current


class ScheduledSwitches(ctl.Controller):
  """The switching oracle: it knows when each phase begins (its first
  arrival) and which fixed split serves that phase best, and switches to
  it there, at the barrier, paying what any resize costs."""

  def __init__(self, engine, schedule, barrier: str, clock):
    super().__init__(engine, _NoRule(), 1, barrier)
    self.schedule, self.clock = list(schedule), clock

  def on_step(self, record) -> None:
    if self.at_barrier():
      return
    chosen = None
    while self.schedule and self.clock() >= self.schedule[0][0]:
      chosen = self.schedule.pop(0)[1]
    if chosen is not None:
      self.apply(chosen)


# "free" is a counterfactual, not a way to serve: decisions applied at
# once and priced at zero, to tell what a rule's choices are worth apart
# from what its compute costs.
DECISIONS = ("inline", "behind", "free")


def serve_open_loop(model, config, budget: DeviceBudget, stream,
                    split: Split, rule, hardware: HardwareProfile,
                    num_phases: int, decision: str = "inline",
                    schedule=None) -> dict[str, Any]:
  """Serves `stream` with arrivals at their modelled seconds.

  `decision`: "inline" stops serving while the controller decides (its
  measured CPU seconds are added to the clock); "behind" runs it off the
  critical path (`BehindController`); "free" decides inline at no cost
  (the counterfactual of a decision that takes no time). `schedule`:
  (second, split) pairs for `ScheduledSwitches` (then `rule` is None).

  Returns:
    tokens, makespan, mean latency (arrival to finish), per-phase tokens,
    resizes, and the seconds the controller added (decisions, resizes).
  """
  if decision not in DECISIONS:
    raise ValueError(f"decision must be one of {DECISIONS}, got "
                     f"{decision!r}.")
  cc = config.controller
  clock = Clock()
  engine = online.make_engine(model, config, budget, split, clock=clock)
  window = online.rule_window(config, rule)
  if schedule is not None:
    control = ScheduledSwitches(engine, schedule, cc.barrier, clock)
  elif rule is None:
    control = None
  elif decision in ("inline", "free"):
    control = ctl.Controller(engine, rule, window, cc.barrier)
  else:
    control = BehindController(engine, rule, window, cc.barrier, clock)
  c = model.config
  bytes_per_param = budget.footprint.expert_bytes // c.expert_params
  expert_bytes = budget.footprint.expert_bytes
  block_bytes = budget.footprint.block_bytes
  phase_of = {r.request_id: p for r, _, p in stream}
  arrival_of = {r.request_id: at for r, at, _ in stream}
  pending = list(stream)
  finished, decision_s, resize_s, steps = [], 0.0, 0.0, 0
  while pending or engine.has_work:
    while pending and pending[0][1] <= clock.now:
      engine.submit(pending.pop(0)[0])
    if not engine.has_work:  # idle until the next arrival
      clock.now = pending[0][1]
      continue
    record = engine.step()
    steps += 1
    clock.now += online.modeled_step_s(record, c, hardware, bytes_per_param)
    if control is not None:
      resizes = len(control.history)
      started = time.perf_counter()
      control.on_step(record)
      spent = time.perf_counter() - started
      added = 0.0
      for entry in control.history[resizes:]:
        added += resize_seconds(entry, hardware, expert_bytes, block_bytes)
        spent -= entry["seconds"]  # drain and resize: priced above
      if decision == "behind":
        spent = 0.0  # off the critical path (counted by the controller)
      elif decision == "free" or schedule is not None:
        # The counterfactual (deciding costs nothing), and the oracle,
        # which knows its schedule: its bookkeeping is the harness's.
        spent = 0.0
      decision_s += max(spent, 0.0)
      resize_s += added
      clock.now += max(spent, 0.0) + added
    finished.extend(engine.pop_finished())
  engine.close()
  tokens = np.zeros(num_phases, np.int64)
  latency = []
  for result in finished:
    if result.error is not None:
      raise RuntimeError(f"request {result.request_id} failed: "
                         f"{result.error}")
    tokens[phase_of[result.request_id]] += len(result.tokens)
    latency.append(result.finish_time - arrival_of[result.request_id])
  history = control.history[1:] if control else []
  off_path = (control.decision_s if isinstance(control, BehindController)
              else 0.0)
  return {"tokens": int(tokens.sum()), "phase_tokens": tokens.tolist(),
          "makespan_s": clock.now, "steps": steps,
          "tokens_per_s": float(tokens.sum()) / clock.now,
          "mean_latency_s": float(np.mean(latency)),
          "resizes": len(history), "decisions": getattr(control,
                                                        "decisions", 0),
          "decision_s": decision_s,
          "resize_s": resize_s, "decision_off_path_s": off_path,
          "preemptions": engine.num_preemptions,
          "splits": [(list(h["slots_per_layer"]), h["kv_blocks"])
                     for h in history]}


class Evaluator:
  """Runs (scenario, seed, configuration) once each, keeping results."""

  def __init__(self, config, model, budget, hardware, metrics):
    self.config, self.model, self.budget = config, model, budget
    self.hardware = hardware
    self.metrics = metrics
    c = model.config
    self.fixed = {s: Split.make(s, budget.max_kv_blocks(s), c.num_layers)
                  for s in config.fixed_slots}
    for split in self.fixed.values():
      budget.check(split)
    self.rules = [f"{rule}@{mode}" for rule in online.rule_names(config)
                  for mode in reports.split_names(config.decisions)]
    # Controller settings per "rule@decision", chosen on the tuning
    # scenario (`tune_settings`): ((field, value), ...).
    self.settings: dict[str, tuple] = {}
    self._done: dict[tuple, dict] = {}

  def _config(self, settings: tuple):
    if not settings:
      return self.config
    config = ml_collections.ConfigDict(self.config.to_dict())
    for field, value in settings:
      config.controller[field] = value
    return config

  def run(self, spec: str, seeds: tuple[int, ...], configuration: str,
          initial: Split | None = None, tag: str = "",
          per_phase: tuple[int, ...] | None = None,
          settings: tuple | None = None) -> dict[str, Any]:
    """One run of scenario `spec` with phase seeds `seeds`:
    `configuration` is "fixed-S" or "rule@decision" (starting at
    `initial`; decision "inline" or "behind", see `serve_open_loop`), or
    "oracle": phase i served by fixed split `per_phase[i]` from its first
    arrival on. A controller runs with `settings` ((field, value) pairs of
    `config.controller`; default: those chosen for it on tuning)."""
    fixed = configuration.startswith("fixed-")
    if settings is None:
      settings = () if fixed else self.settings.get(configuration, ())
    key = (spec, seeds, configuration, None if fixed else initial, tag,
           per_phase, settings)
    if key in self._done:
      return self._done[key]
    phases = scenario_phases(self.config, spec)
    stream = make_stream(phases, self.model.config.vocab_size, seeds,
                         self.config.arrival_step_s)
    decision, schedule = "inline", None
    if fixed:
      split, rule = self.fixed[int(configuration[6:])], None
    elif configuration == "oracle":
      first = {}
      for _, at, phase in stream:
        first.setdefault(phase, at)
      schedule = [(first[i], self.fixed[s]) for i, s in enumerate(per_phase)
                  if i in first]
      split, rule = self.fixed[per_phase[0]], None
    else:
      name, decision = configuration.split("@")
      split = initial
      rule = online.make_rule(name, self._config(settings), self.model,
                              self.budget, self.hardware)
    out = serve_open_loop(self.model, self._config(settings), self.budget,
                          stream, split, rule, self.hardware, len(phases),
                          decision, schedule)
    self.metrics.write(json.dumps({"scenario": spec, "seeds": seeds,
                                   "configuration": configuration,
                                   "tag": tag, "settings": dict(settings),
                                   **out}) + "\n")
    self.metrics.flush()
    logging.info("%-22s seeds %s %-12s %s: %.0f tok/s, %d resizes", spec,
                 seeds, configuration, tag, out["tokens_per_s"],
                 out["resizes"])
    self._done[key] = out
    return out


def evaluate_scenario(ev: Evaluator, spec: str, seeds, initial: Split,
                      tuned: str, tag: str = "") -> dict[str, Any]:
  """Every configuration on every seed of one scenario; the ratios."""
  fixed = [f"fixed-{s}" for s in ev.fixed]
  phases = reports.split_names(spec)
  runs = {name: [ev.run(spec, phase_seeds(seed, len(phases)), name, initial,
                        tag) for seed in seeds]
          for name in fixed + list(ev.rules)}
  speed = {n: np.array([r["tokens_per_s"] for r in v])
           for n, v in runs.items()}
  hindsight = max(fixed, key=lambda n: speed[n].mean())
  # The switching oracle: each phase's best fixed split (served alone, in
  # hindsight), switched to at the phase's first arrival.
  oracle_runs = []
  for seed in seeds:
    best = []
    for name, phase_seed in zip(phases, phase_seeds(seed, len(phases))):
      alone = {f: ev.run(name, (phase_seed,), f, None, tag) for f in fixed}
      best.append(int(min(alone, key=lambda f: alone[f]["makespan_s"])[6:]))
    oracle_runs.append(ev.run(spec, phase_seeds(seed, len(phases)), "oracle",
                              None, tag, tuple(best)))
  oracle = np.array([r["tokens_per_s"] for r in oracle_runs])
  worst = min(fixed, key=lambda n: speed[n].mean())
  out = {"phases": phases, "seeds": list(seeds), "tuned_fixed": tuned,
         "best_fixed_in_hindsight": hindsight,
         # What adapting could win at most (the oracle, switches priced)
         # and what the split is worth at all (best over worst fixed).
         "oracle_over_best_fixed": mean_interval(oracle / speed[hindsight]),
         "best_over_worst_fixed": mean_interval(speed[hindsight] /
                                                speed[worst]),
         "tokens_per_s": {n: mean_interval(v) for n, v in speed.items()},
         "oracle_tokens_per_s": mean_interval(oracle),
         "oracle_resizes_per_run": float(np.mean(
             [r["resizes"] for r in oracle_runs])),
         "controllers": {}}
  for rule in ev.rules:
    mine = speed[rule]
    out["controllers"][rule] = {
        "over_tuned_fixed": mean_interval(mine / speed[tuned]),
        "over_best_fixed_in_hindsight": mean_interval(mine / speed[hindsight]),
        "over_switching_oracle": mean_interval(mine / oracle),
        "resizes_per_run": float(np.mean([r["resizes"] for r in runs[rule]])),
        "decision_s_share": float(np.mean(
            [r["decision_s"] / r["makespan_s"] for r in runs[rule]])),
        # Controller CPU per decision (inline: with its per-step
        # bookkeeping; behind: the decisions alone), median over runs.
        "ms_per_decision": float(np.median(
            [1e3 * (r["decision_s"] + r["decision_off_path_s"]) /
             max(r["decisions"], 1) for r in runs[rule]])),
        "resize_s_share": float(np.mean(
            [r["resize_s"] / r["makespan_s"] for r in runs[rule]])),
        "latency_over_tuned_fixed": mean_interval(
            [a["mean_latency_s"] / b["mean_latency_s"]
             for a, b in zip(runs[rule], runs[tuned])])}
  return out


def grid(config, rule: str) -> list[tuple]:
  """Every combination of `config.tuning_grid[rule]` (field -> values,
  comma-separated), as ((field, value), ...) tuples; [()] without one."""
  if rule not in config.tuning_grid:
    return [()]
  fields = config.tuning_grid[rule]
  unknown = [f for f in fields if f not in config.controller]
  if unknown:
    raise ValueError(f"tuning_grid.{rule} names unknown controller fields "
                     f"{unknown}.")
  values = [[type(config.controller[f])(v) for v in
             reports.split_names(str(fields[f]))] for f in fields]
  return [tuple(zip(fields, combo)) for combo in itertools.product(*values)]


def tune_settings(ev: "Evaluator", spec: str, seeds, initial: Split
                  ) -> dict[str, Any]:
  """Chooses each controller's settings on the tuning scenario (the best
  mean throughput over `seeds`) and freezes them in `ev.settings`."""
  out = {}
  for configuration in ev.rules:
    rule = configuration.split("@")[0]
    tried = {}
    for settings in grid(ev.config, rule):
      tried[settings] = float(np.mean([ev.run(
          spec, phase_seeds(s, len(reports.split_names(spec))),
          configuration, initial, settings=settings)["tokens_per_s"]
                                       for s in seeds]))
    best = max(tried, key=tried.get)
    ev.settings[configuration] = best
    out[configuration] = {"chosen": dict(best), "tried": [
        {"settings": dict(k), "tokens_per_s": v} for k, v in tried.items()]}
  return out


def _seeds(text) -> list[int]:
  return [int(s) for s in reports.split_names(str(text))]


def _floats(text) -> list[float]:
  return [float(s) for s in reports.split_names(str(text))] if str(
      text).strip() else []


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """The whole protocol (module docstring); returns the summary."""
  reports.start_logging()
  out = common.start(workdir, config)
  model, origin = serve.load_model(config)
  budget = online.make_budget(config, model)
  hardware = get_profile(config.hardware)
  tuning_seeds, seeds = _seeds(config.tuning_seeds), _seeds(config.seeds)
  overlap = set(tuning_seeds) & set(seeds)
  if overlap:
    raise ValueError(f"seeds {sorted(overlap)} are used for tuning too; "
                     "evaluation seeds must be held out.")
  with open(common.metrics_path(out), "w") as metrics:
    ev = Evaluator(config, model, budget, hardware, metrics)
    fixed = [f"fixed-{s}" for s in ev.fixed]
    num_tuning = len(reports.split_names(config.tuning))
    tuning = {f: float(np.mean([ev.run(
        config.tuning, phase_seeds(s, num_tuning), f)["tokens_per_s"]
                                for s in tuning_seeds])) for f in fixed}
    tuned = max(fixed, key=tuning.get)
    initial = ev.fixed[int(tuned[6:])]
    logging.info("tuning scenario %s: best fixed split %s", config.tuning,
                 tuned)
    controller_tuning = tune_settings(ev, config.tuning, tuning_seeds,
                                      initial)
    chosen = reports.split_names(config.evaluate)
    unknown = [n for n in chosen if n not in config.scenarios]
    if unknown:
      raise ValueError(f"evaluate names unknown scenarios {unknown}; known: "
                       f"{sorted(config.scenarios)}.")
    scenarios = {name: evaluate_scenario(ev, config.scenarios[name], seeds,
                                         initial, tuned) for name in chosen}
    sensitivity = {}
    variants = ([("step_overhead_s", v) for v in
                 _floats(config.sensitivity_overheads)] +
                [("h2d_scale", v) for v in
                 _floats(config.sensitivity_h2d_scales)])
    for field, value in variants:
      changed = (dataclasses.replace(hardware, step_overhead_s=value)
                 if field == "step_overhead_s" else dataclasses.replace(
                     hardware, h2d_bytes_per_s=hardware.h2d_bytes_per_s *
                     value))
      sub = Evaluator(config, model, budget, changed, metrics)
      sub.settings = dict(ev.settings)
      label = f"{field}={value:g}"
      sensitivity[label] = {
          name: evaluate_scenario(sub, config.scenarios[name],
                                  _seeds(config.sensitivity_seeds), initial,
                                  tuned, tag=label)["controllers"]
          for name in reports.split_names(config.sensitivity_scenarios)}
  summary = {"model": model.config.name, "model_origin": origin,
             "hardware": dataclasses.asdict(hardware),
             "tuning": {"scenario": config.tuning, "seeds": tuning_seeds,
                        "tokens_per_s": tuning, "chosen": tuned,
                        "controllers": controller_tuning},
             "scenarios": scenarios, "sensitivity": sensitivity}
  common.finish(out, summary)
  return reports.Report(summary, table(summary))


def _ci(v: dict) -> str:
  return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def table(summary: dict[str, Any]) -> str:
  """Controller ratios per scenario (mean, 95% interval over seeds)."""
  rows = []
  for name, s in summary["scenarios"].items():
    for rule, r in s["controllers"].items():
      rows.append([name, rule, _ci(r["over_tuned_fixed"]),
                   _ci(r["over_best_fixed_in_hindsight"]),
                   _ci(r["over_switching_oracle"]),
                   f"{r['resizes_per_run']:.1f}",
                   f"{r['decision_s_share'] + r['resize_s_share']:.1%}",
                   s["best_fixed_in_hindsight"]])
  head = ["scenario", "controller", "/ tuned fixed", "/ best fixed",
          "/ switching oracle", "resizes", "overhead", "best fixed"]
  headroom = reports.text_table(
      ["scenario", "best fixed / worst fixed", "oracle / best fixed"],
      [[name, _ci(s["best_over_worst_fixed"]),
        _ci(s["oracle_over_best_fixed"])]
       for name, s in summary["scenarios"].items()])
  tuning = summary["tuning"]
  chosen = "; ".join(f"{name} {c['chosen']}" for name, c in
                     tuning["controllers"].items())
  text = (f"tuned on scenario {tuning['scenario']}: fixed split "
          f"{tuning['chosen']}; controller settings: {chosen}\n" +
          reports.text_table(head, rows) +
          "\n\nwhat the split is worth per scenario:\n" + headroom)
  for label, scenarios in summary["sensitivity"].items():
    text += f"\n{label}: " + "; ".join(
        f"{name} {rule} {_ci(r['over_best_fixed_in_hindsight'])}"
        for name, rules in scenarios.items() for rule, r in rules.items())
  return text
