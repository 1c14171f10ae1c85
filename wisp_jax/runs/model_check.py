"""The throughput model checked against executed engine runs.

`run(config, workdir)`; see configs/model_check.py. For every workload
(a model preset with random weights, request lengths, a batch of C) and
every split (uniform slots, KV blocks):

  1. profile: the routing of *other* requests of the same distribution
     (another prompt seed), recorded with `serving.record.record`, gives
     the routing curves, as the offline configurator would get them;
     `half_samples` random halves of those requests give each
     prediction's request-sampling standard error (`profile_relative_se`:
     how far another profile of the same size would move it);
  2. execute: the serving engine serves a closed loop of C requests (a
     finished request is replaced at once) with max batch C; a wrapper
     around the executor counts every pass (prefill or decode, its rows,
     context, hits, misses and copies); the steady window runs from
     `warmup_steps` to the last step that still had C requests;
  3. predict: `alloc.throughput.prediction` for the run's lengths, the
     profile's curves and the split, at max batch C;
  4. compare per run: mean decode batch, expert misses per decode pass,
     expert copies per prefill pass, preemptions per step, KV blocks in
     use, and modelled seconds per output token (each side's counts priced
     by the same `sim.cost.step_cost`), with each executed rate's
     standard error (batch means, `relative_standard_errors`): where it
     exceeds 2.5%, a 5% agreement is below the run's own noise. Its
     parts span different requests, so it holds the served requests'
     sampling too; with the profile's, it bounds what a run resolves;
  5. decompose the traffic error (`decomposition`: decode misses per
     decode pass and copies per prefill pass, each step closer to the
     engine): the prediction; the prediction with curves profiled on the
     served requests themselves (the routing sample); the model's curves
     averaged over the executed decode batch sizes at the executed prefill
     rate (the KV dynamics); Mattson's counting (`alloc.steady`) replayed
     on the executed passes' own needed sets (the counting); and the
     engine. The executed prefills are also split by kind
     (`recompute_rates`): a recompute re-admits a preempted request (the
     model prices it by its own curve, `alloc.steady`'s probes).

Workloads tagged `fit` were used to fix the model; `held` ones were not
(the report gives the agreement of each set). Writes `config.json`,
`metrics.jsonl` (one line per run), `summary.json` and
`predicted_vs_executed.png`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wisp_jax.alloc import steady
from wisp_jax.alloc import throughput
from wisp_jax.alloc.curves import curves_from_trace
from wisp_jax.alloc.split import Split
from wisp_jax.alloc.workload import Workload
from wisp_jax.models import config as config_lib
from wisp_jax.models.transformer import MoEModel
from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.serving import record as record_lib
from wisp_jax.serving import request_stream
from wisp_jax.serving.engine import Engine
from wisp_jax.sim import cost
from wisp_jax.sim.hardware import get_profile
from wisp_jax.traces.trace import PREFILL
from wisp_jax.traces.trace import RoutingTrace

# (name, what the model predicts, what the engine executed).
METRICS = (
    ("batch", "mean decode batch"),
    ("decode_misses", "expert misses per decode pass"),
    ("prefill_loads", "expert copies per prefill pass"),
    ("preemptions", "preemptions per step"),
    ("kv_in_use", "KV blocks in use"),
    ("seconds_per_token", "modelled seconds per output token"),
)
# The traffic metrics whose error `decomposition` splits by cause.
DECOMPOSED = ("decode_misses", "prefill_loads")
# Below these, both sides count as equal (rates of rare events).
ABSOLUTE = {"preemptions": 0.01}


@dataclasses.dataclass
class Pass:
  """One executed forward pass (`needed`: `[L, E]` its needed experts, from
  the pager's last-use ticks; None where the policy keeps none;
  `recompute`: a prefill of a preempted request's prompt and output)."""
  kind: str
  rows: int
  context: int
  hits: int
  misses: int
  loads: int
  needed: np.ndarray | None = None
  recompute: bool = False


class PassRecorder:
  """Wraps an engine's executor so every pass is counted (pager counters
  before and after each call)."""

  def __init__(self, engine: Engine):
    self.executor = engine.executor
    self.passes: list[Pass] = []
    inner = self.executor.run

    def run(rows, batch, t, kind):
      before = self.executor.counters.sum(axis=1)
      out = inner(rows, batch, t, kind)
      hits, misses, loads = (int(x) for x in
                             self.executor.counters.sum(axis=1) - before)
      context = (len(rows[0].tokens) if kind == "prefill" else
                 sum(int(r.length) + 1 for r in rows))
      state = self.executor.pager_state
      needed = None
      if state is not None and hasattr(state.policy_state, "last_use"):
        last_use, tick = jax.device_get((state.policy_state.last_use,
                                         state.tick))
        needed = np.asarray(last_use) == int(tick) - 1  # this pass's tick
      self.passes.append(Pass(kind, len(rows), context, hits, misses, loads,
                              needed, kind == "prefill" and
                              rows[0].counter > 0))
      return out

    self.executor.run = run

  def take(self) -> list[Pass]:
    out, self.passes = self.passes, []
    return out


def make_model(preset: str, seed: int, dtype: str) -> MoEModel:
  return MoEModel(config_lib.get_config(preset), rngs=nnx.Rngs(seed),
                  dtype=jnp.dtype(dtype))


def make_requests(wc, vocab_size: int, seed: int):
  return request_stream.synthetic_workload(
      wc.num_requests, (wc.prompt_len_min, wc.prompt_len_max),
      (wc.output_len_min, wc.output_len_max), "all", 1.0, vocab_size,
      wc.temperature, seed)


def profile_trace(model: MoEModel, wc, seed: int, requests=None
                  ) -> RoutingTrace:
  """The routing of `profile_requests` other requests (recorded in waves
  of 8 at the workload's temperature, each cut to its own output length),
  or of `requests`."""
  if requests is None:
    requests = make_requests(dict_to_config(
        wc, num_requests=wc.profile_requests), model.config.vocab_size, seed)
  longest = max(r.max_new_tokens for r in requests)
  trace = record_lib.record(model, [r.prompt for r in requests], longest, 8,
                            equal_length=False, temperature=wc.temperature,
                            seed=seed,
                            source=f"model_check profile seed {seed}")
  last = {i: len(r.prompt) + r.max_new_tokens - 1
          for i, r in enumerate(requests)}
  keep = (trace.phase == PREFILL) | (trace.position < np.vectorize(
      last.get)(trace.request))
  return trace.select(keep)


def profile_curves(model: MoEModel, wc, seed: int, requests=None):
  """The routing curves of `profile_trace`."""
  return curves_from_trace(profile_trace(model, wc, seed, requests))


def half_samples(trace: RoutingTrace, count: int, seed: int
                 ) -> list[RoutingTrace]:
  """`count` random halves of `trace`'s requests (each its own draw)."""
  ids = np.unique(trace.request)
  if ids.size < 4:
    raise ValueError(f"half samples need at least 4 profiled requests, got "
                     f"{ids.size}.")
  rng = np.random.default_rng(seed)
  return [trace.select(np.isin(trace.request, rng.choice(
      ids, ids.size // 2, replace=False))) for _ in range(count)]


def relative_spread(whole: dict[str, float], parts: list[dict[str, float]]
                    ) -> dict[str, float]:
  """Per rate, the root mean square of `parts`' values about `whole`'s,
  over `whole`'s (NaN where `whole` is zero or there are no parts)."""
  return {name: float(np.sqrt(np.mean([(p[name] / value - 1.0) ** 2
                                       for p in parts])))
          if value and parts else float("nan")
          for name, value in whole.items()}


def sampling_relative_errors(workload: Workload, halves, splits,
                             max_batch: int) -> list[dict[str, float]]:
  """Per split, each predicted rate's request-sampling standard error over
  its value: the `relative_spread` of the predictions from the profile's
  half samples about the whole profile's (a half's deviation from the
  whole has about the whole's sampling variance)."""
  parts = [dataclasses.replace(workload, curves=curves_from_trace(h),
                               name=f"{workload.name} (half {i})")
           for i, h in enumerate(halves)]
  return [relative_spread(predicted_rates(workload, s, max_batch),
                          [predicted_rates(w, s, max_batch) for w in parts])
          for s in splits]


def dict_to_config(wc, **changes):
  out = ml_collections.ConfigDict(wc.to_dict())
  for key, value in changes.items():
    out[key] = value
  return out


def serve(model: MoEModel, requests, split: Split, wc, num_slots: int,
          warmup: int) -> dict[str, Any]:
  """Closed loop of `wc.concurrency` requests; executed rates over the
  steady window."""
  c = wc.concurrency
  engine = Engine(model, None, split.slots_per_layer, split.kv_blocks,
                  wc.block_size, c, min_prefill_bucket=32,
                  num_slots=num_slots)
  recorder = PassRecorder(engine)
  pending = list(requests)
  steps, last_full = [], None
  while pending or engine.has_work:
    while pending and engine.num_running + engine.queue_length < c:
      engine.submit(pending.pop(0))
    if not pending and last_full is None:
      last_full = len(steps)
    record = engine.step()
    steps.append((record, recorder.take()))
    engine.pop_finished()
  engine.close()
  window = steps[warmup:last_full]
  if len(window) < 20:
    raise ValueError(f"only {len(window)} steady steps: raise num_requests "
                     f"(now {wc.num_requests}) or lower warmup_steps.")
  return {"steps": window, "num_steps": len(window)}


def executed_rates(window, model_config, hardware, bytes_per_param: int
                   ) -> dict[str, float]:
  """What the engine did per step over the window, and its modelled time
  (each pass priced at its own rows, context and needed experts)."""
  tau = cost.expert_bytes(model_config, bytes_per_param) / (
      hardware.h2d_bytes_per_s)
  decode = [p for _, ps in window for p in ps if p.kind == "decode"]
  prefill = [p for _, ps in window for p in ps if p.kind == "prefill"]
  records = [r for r, _ in window]
  n = len(records)
  seconds = 0.0
  for p in decode + prefill:
    batch = p.rows if p.kind == "decode" else 1
    context = p.context / p.rows if p.kind == "decode" else p.context
    seconds += cost.step_cost(
        model_config, hardware, batch=batch,
        context_len=max(int(round(context)), 1), mode="paged",
        phase=p.kind, misses=0, needed_experts=p.hits + p.misses,
        bytes_per_param=bytes_per_param).total_s + tau * p.loads
  tokens = sum(r.batch_size + r.prefills for r in records)
  return {
      "batch": float(np.mean([p.rows for p in decode])),
      "decode_misses": float(np.mean([p.misses for p in decode])),
      "decode_loads": float(np.mean([p.loads for p in decode])),
      "prefill_loads": float(np.mean([p.loads for p in prefill]))
                       if prefill else 0.0,
      "prefills": len(prefill) / n,
      "preemptions": sum(r.preemptions for r in records) / n,
      "kv_in_use": float(np.mean([r.kv_blocks_in_use for r in records])),
      "tokens_per_step": tokens / n,
      "seconds_per_token": seconds / tokens}


def recompute_rates(window) -> dict[str, float]:
  """The executed prefills by kind: the share that re-admit a preempted
  request (`recompute_share`) and the expert copies per new and per
  recompute prefill (NaN where there is none of the kind)."""
  prefill = [p for _, ps in window for p in ps if p.kind == "prefill"]
  loads = lambda again: [p.loads for p in prefill if p.recompute == again]
  mean = lambda x: float(np.mean(x)) if x else float("nan")
  return {"recompute_share": mean([p.recompute for p in prefill]),
          "new_prefill_loads": mean(loads(False)),
          "recompute_prefill_loads": mean(loads(True))}


def relative_standard_errors(window, model_config, hardware,
                             bytes_per_param: int, chunks: int = 10
                             ) -> dict[str, float]:
  """Each executed rate's standard error over its value, by batch means:
  the window cut into `chunks` runs of consecutive steps (close to
  independent when each spans many requests' lifetimes), the spread of
  their rates over sqrt(chunks). A part without prefills has no prefill
  loads and is left out of that metric's spread; a metric measured in
  fewer than two parts, or whose rate is zero, gets NaN."""
  if chunks < 2:
    raise ValueError(f"chunks must be >= 2, got {chunks}.")
  parts = [[window[i] for i in idx]
           for idx in np.array_split(np.arange(len(window)), chunks)]
  parts = [p for p in parts if any(x.kind == "decode" for _, ps in p
                                   for x in ps)]
  whole = executed_rates(window, model_config, hardware, bytes_per_param)
  rates = [(executed_rates(p, model_config, hardware, bytes_per_param),
            any(x.kind == "prefill" for _, ps in p for x in ps))
           for p in parts]
  out = {}
  for name, value in whole.items():
    values = np.array([r[name] for r, prefilled in rates
                       if prefilled or name != "prefill_loads"])
    out[name] = (float(values.std(ddof=1) / np.sqrt(values.size) / value)
                 if values.size >= 2 and value else float("nan"))
  return out


def predicted_rates(workload: Workload, split: Split, max_batch: int
                    ) -> dict[str, float]:
  p = throughput.prediction(workload, split, max_batch=max_batch, fixed=True)
  return {"batch": p.batch, "decode_misses": p.decode_misses_per_step,
          "decode_loads": p.decode_loads_per_step,
          "prefill_loads": p.prefill_loads_per_prefill,
          "prefills": p.prefills_per_step,
          "preemptions": p.preemptions_per_step,
          "kv_in_use": p.kv_blocks_in_use,
          "tokens_per_step": p.tokens_per_step,
          "seconds_per_token": p.seconds_per_token}


def at_executed_mix(workload: Workload, split: Split, window
                    ) -> dict[str, float]:
  """The model's traffic curves read at the executed decode batch sizes
  (each pass at its own level), the executed prefill rate and share of
  recompute prefills, instead of at the modelled mean batch."""
  t = throughput.tables(workload)
  caps = np.asarray(split.slots_per_layer, np.int64)
  layers = np.arange(caps.size)
  decode = [p for _, ps in window for p in ps if p.kind == "decode"]
  prefills = sum(p.kind == "prefill" for _, ps in window for p in ps)
  rate = prefills / max(len(decode), 1)
  cv = t.curves
  level = lambda name, n: float(cv[name][min(n, len(cv[name])) - 1][
      layers, caps].sum())
  misses = np.mean([level("decode_misses", p.rows) + rate * level(
      "eviction_misses", p.rows) for p in decode])
  n = int(round(np.mean([p.rows for p in decode])))
  share = recompute_rates(window)["recompute_share"]
  share = share if np.isfinite(share) else 0.0
  return {"decode_misses": float(misses),
          "prefill_loads": (1 - share) * level("prefill_loads", n) +
                           share * level("recompute_loads", n)}


def replayed_counts(window, split: Split) -> dict[str, float] | None:
  """Mattson's counting of the executed passes' own needed sets
  (`alloc.steady.lru_pass_counts`, the model's counting), per pass; None
  when the passes carry no needed sets."""
  passes = [p for _, ps in window for p in ps]
  if not passes or any(p.needed is None for p in passes):
    return None
  masks = np.stack([p.needed for p in passes])
  kinds = np.array([steady.PREFILL_PASS if p.kind == "prefill" else
                    steady.DECODE_PASS for p in passes])
  decode, prefill = steady.lru_pass_counts(masks, kinds,
                                           np.ones(len(passes), bool))
  caps = np.asarray(split.slots_per_layer, np.int64)
  layers = np.arange(caps.size)
  return {"decode_misses": float(decode.misses[layers, caps].sum()) /
                           max(decode.passes, 1),
          "prefill_loads": float(prefill.loads[layers, caps].sum()) /
                           max(prefill.passes, 1)}


def relative_error(name: str, predicted: float, executed: float) -> float:
  floor = ABSOLUTE.get(name, 0.0)
  if abs(predicted - executed) <= floor:
    return 0.0
  return predicted / executed - 1.0 if executed else float("inf")


def splits_of(wc, num_layers: int) -> list[Split]:
  slots = [int(s) for s in reports.split_names(str(wc.slots))]
  blocks = [int(b) for b in reports.split_names(str(wc.kv_blocks))]
  return [Split.make(s, b, num_layers) for s in slots for b in blocks]


def _plot(rows, path: pathlib.Path) -> None:
  fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
  for ax, (name, label) in zip(axes.ravel(), METRICS):
    for tag, marker in (("fit", "o"), ("held", "^")):
      pts = [(r["executed"][name], r["predicted"][name]) for r in rows
             if r["set"] == tag]
      if pts:
        x, y = np.array(pts).T
        ax.scatter(x, y, marker=marker, label=f"{tag} workloads")
    values = [v for r in rows for v in (r["executed"][name],
                                        r["predicted"][name])]
    top = max(values + [1e-9]) * 1.08
    line = np.linspace(0, top, 2)
    ax.plot(line, line, "k-", lw=0.8)
    ax.fill_between(line, 0.95 * line, 1.05 * line, color="k", alpha=0.1,
                    label="within 5%")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("executed")
    ax.set_ylabel("predicted")
    ax.set_title(label, fontsize=10)
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Throughput model vs executed engine runs (one point per run)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _decomposition_table(rows) -> str:
  steps = ("predicted", "own_routing", "executed_mix", "replayed")

  def cell(r, step, metric):
    d = r["decomposition"]
    if d[step] is None:
      return "-"
    error = relative_error(metric, d[step][metric], d["executed"][metric])
    return f"{error:+.1%}"

  def se(r, key, metric):
    value = (r[key] or {}).get(metric, float("nan"))
    return f"{value:.1%}" if np.isfinite(value) else "-"

  def recomputes(r, metric):
    share = r["executed_prefills"]["recompute_share"]
    return (f"{share:.0%}" if metric == "prefill_loads" and
            np.isfinite(share) else "-")

  return reports.text_table(
      ["workload", "slots", "KV", "metric"] + list(steps) +
      ["SE executed", "SE profile", "recomputes"],
      [[r["workload"], r["slots"], r["kv_blocks"], m] +
       [cell(r, step, m) for step in steps] +
       [se(r, "executed_relative_se", m), se(r, "profile_relative_se", m),
        recomputes(r, m)]
       for r in rows for m in DECOMPOSED])


def _agreement(rows, tag: str) -> dict[str, Any]:
  """Per metric: the errors' worst and median, the runs within 5%, those
  within 5% or within two standard errors of the executed rate
  (`within_5pct_or_2se`: a 5% target that the run's own sampling noise
  cannot resolve), and those within 5% or two standard errors of the
  difference (`within_5pct_or_2se_both`: the executed rate's and the
  profile's request sampling, taken as independent; None without half
  samples), with the median relative standard errors."""
  chosen = [r for r in rows if r["set"] == tag]
  sampled = all(r["profile_relative_se"] is not None for r in chosen)
  out = {}
  for name, _ in METRICS:
    errors = [abs(r["error"][name]) for r in chosen]
    noise = [r["executed_relative_se"][name] for r in chosen]
    profile = [r["profile_relative_se"][name] if sampled else float("nan")
               for r in chosen]
    both = [float(np.hypot(se, p if np.isfinite(p) else 0.0))
            for se, p in zip(noise, profile)]

    def within(ses):
      return sum(e <= 0.05 or (np.isfinite(se) and e <= 2 * se)
                 for e, se in zip(errors, ses))

    def median(ses):
      return (float(np.nanmedian(ses)) if errors and np.isfinite(ses).any()
              else None)

    out[name] = {"worst_abs_error": max(errors) if errors else None,
                 "median_abs_error": float(np.median(errors)) if errors
                 else None,
                 "within_5pct": sum(e <= 0.05 for e in errors),
                 "within_5pct_or_2se": within(noise),
                 "within_5pct_or_2se_both": within(both) if sampled
                 else None,
                 "median_relative_se": median(noise),
                 "median_profile_relative_se": median(profile) if sampled
                 else None,
                 "runs": len(errors)}
  return out


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Runs every workload and split; returns the summary."""
  reports.start_logging()
  out = common.start(workdir, config)
  hardware = get_profile(config.hardware)
  models, rows = {}, []
  with open(common.metrics_path(out), "w") as metrics:
    for name, wc in config.workloads.items():
      if wc.preset not in models:
        models[wc.preset] = make_model(wc.preset, config.seed, config.dtype)
      model = models[wc.preset]
      mc = model.config
      profile = profile_trace(model, wc, wc.seed + 1000)
      curves = curves_from_trace(profile)
      requests = make_requests(wc, mc.vocab_size, wc.seed)
      own_curves = profile_curves(model, wc, wc.seed, requests)
      prompt = np.array([len(r.prompt) for r in requests])
      output = np.array([r.max_new_tokens for r in requests])
      workload = Workload(model=mc, hardware=hardware, prompt_lens=prompt,
                          output_lens=output, concurrency=wc.concurrency,
                          curves=curves,
                          bytes_per_param=config.bytes_per_param,
                          block_size=wc.block_size, name=name)
      own = dataclasses.replace(workload, curves=own_curves,
                                name=f"{name} (own routing)")
      splits = splits_of(wc, mc.num_layers)
      num_slots = max(max(s.slots_per_layer) for s in splits)
      sampling = sampling_relative_errors(
          workload, half_samples(profile, config.half_samples,
                                 wc.seed + 2000), splits, wc.concurrency
      ) if config.half_samples else [None] * len(splits)
      for split, profile_se in zip(splits, sampling):
        executed = serve(model, requests, split, wc, num_slots,
                         config.warmup_steps)
        got = executed_rates(executed["steps"], mc, hardware,
                             config.bytes_per_param)
        noise = relative_standard_errors(executed["steps"], mc, hardware,
                                         config.bytes_per_param)
        want = predicted_rates(workload, split, wc.concurrency)
        steps_window = executed["steps"]
        decomposition = {
            "predicted": {k: want[k] for k in DECOMPOSED},
            "own_routing": {k: predicted_rates(own, split, wc.concurrency)[k]
                            for k in DECOMPOSED},
            "executed_mix": at_executed_mix(own, split, steps_window),
            "replayed": replayed_counts(steps_window, split),
            "executed": {k: got[k] for k in DECOMPOSED}}
        row = {"workload": name, "set": wc.set, "preset": wc.preset,
               "slots": split.slots_per_layer[0], "kv_blocks":
               split.kv_blocks, "steady_steps": executed["num_steps"],
               "executed": got, "executed_relative_se": noise,
               "executed_prefills": recompute_rates(steps_window),
               "profile_relative_se": profile_se,
               "predicted": want,
               "error": {k: relative_error(k, want[k], got[k])
                         for k in got},
               "decomposition": decomposition}
        rows.append(row)
        metrics.write(json.dumps(row) + "\n")
        logging.info(
            "%-14s %-4s slots %2d KV %4d: %s", name, wc.set,
            row["slots"], row["kv_blocks"],
            " ".join(f"{k} {want[k]:.3g}/{got[k]:.3g}" for k, _ in METRICS))
  summary = {"hardware": hardware.name, "metrics": dict(METRICS),
             "agreement": {"fit": _agreement(rows, "fit"),
                           "held": _agreement(rows, "held")},
             "runs": rows}
  common.finish(out, summary)
  _plot(rows, out / "predicted_vs_executed.png")
  table = reports.text_table(
      ["workload", "set", "slots", "KV"] + [m for m, _ in METRICS],
      [[r["workload"], r["set"], r["slots"], r["kv_blocks"]] +
       [f"{r['error'][m]:+.1%}" for m, _ in METRICS] for r in rows])
  table += ("\n\ntraffic error by cause (profiled on other requests -> on "
            "the served requests -> their curves at the executed batch mix "
            "-> the model's counting of the executed passes; recomputes: "
            "the executed prefills that re-admit a preempted request):\n"
            + _decomposition_table(rows))
  held = summary["agreement"]["held"].items()
  text = ("predicted / executed - 1 per run:\n" + table + "\n\nworst |error| "
          "on held-aside workloads: " + ", ".join(
              f"{m} {v['worst_abs_error']:.1%}" for m, v in held
              if v["worst_abs_error"] is not None) +
          "\nheld-aside runs within 5% (within 5% or 2 standard errors of "
          "the executed rate): " + ", ".join(
              f"{m} {v['within_5pct']}/{v['runs']} "
              f"({v['within_5pct_or_2se']}/{v['runs']})" for m, v in held))
  if all(v["within_5pct_or_2se_both"] is not None for _, v in held):
    text += ("\nheld-aside runs within 5% or 2 standard errors of the "
             "difference (the executed rate's and the profile's request "
             "sampling): " + ", ".join(
                 f"{m} {v['within_5pct_or_2se_both']}/{v['runs']}"
                 for m, v in held))
  logging.info("\n%s", text)
  return reports.Report(summary, text)
