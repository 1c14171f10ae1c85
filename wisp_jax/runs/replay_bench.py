"""Replay speed per policy and Mattson-curve time: `run(config, workdir)`.

See configs/replay_bench.py. Writes `config.json`, `metrics.jsonl` (one
line per policy, then one per measurement of the comparison) and
`summary.json` (the trace, the machine and, per policy, the timed seconds,
routing events/s and hit rate) to `workdir`.

With `config.vs_python`, LRU replay is also compared with a plain-Python
LRU (`python_lru`: an OrderedDict per layer, the pager's tie order, its
input lists built before the clock starts), all
variants interleaved inside each repeat (`runs.timing.interleaved`) in this
process: `replay` of the one capacity (its stack-distance fast path) and
`replay_many` of `many_capacities` at once (its time per capacity). Each
variant's hits must equal the Python LRU's, or the run fails.
"""

from __future__ import annotations

import collections
import json
import pathlib
import statistics
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.runs import timing
from wisp_jax.sim import mrc, replay
from wisp_jax.traces import synthetic


def _time(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def needed_lists(masks: np.ndarray) -> list[list[list[int]]]:
  """Per layer, per step, the needed experts in descending id order: the
  plain-Python LRU's input (built once, outside its timing)."""
  steps, num_layers, _ = masks.shape
  return [[np.flatnonzero(masks[t, l])[::-1].tolist() for t in range(steps)]
          for l in range(num_layers)]


def python_lru(needed: list[list[list[int]]], capacity: int) -> np.ndarray:
  """`[L]` hits of a plain-Python LRU (one OrderedDict per layer) over
  `needed_lists`; steps must fit (at most `capacity` needed). Among experts
  last used in the same step the higher id is evicted first, as the pager
  does (ids arrive in descending order, so the lowest ends newest)."""
  hits = []
  for steps in needed:
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    count = 0
    for now in steps:
      for e in now:
        if e in cache:
          count += 1
          cache.move_to_end(e)
        else:
          cache[e] = None
      while len(cache) > capacity:
        cache.popitem(last=False)
    hits.append(count)
  return np.asarray(hits, np.int64)


def vs_python(trace, batching: str, config, metrics) -> dict[str, Any]:
  """Python LRU vs `replay` and `replay_many`, interleaved; hits checked."""
  masks = replay.needed_masks(trace, batching)
  if int(masks.sum(axis=-1).max()) > config.capacity:
    why = (f"a step needs more than capacity={config.capacity} experts; "
           "the Python LRU handles steps that fit only")
    logging.warning("no comparison with Python: %s", why)
    return {"skipped": why}
  many = [int(c) for c in reports.split_names(str(config.many_capacities))]
  if config.capacity not in many:
    raise ValueError(f"many_capacities {many} must include capacity="
                     f"{config.capacity} (its hits are checked).")
  needed = needed_lists(masks)
  want = python_lru(needed, config.capacity)
  got = {}

  def one():
    got["replay"] = replay.replay(trace, "lru", config.capacity,
                                  batching=batching,
                                  num_slots=config.capacity).hits

  def all_caps():
    results = replay.replay_many(trace, "lru", many, batching=batching)
    got["replay_many"] = results[many.index(config.capacity)].hits

  one(), all_caps()  # compiled outside the timed repeats
  for name in got:
    if not np.array_equal(got[name], want):
      raise AssertionError(f"{name} hits {got[name].tolist()} != the Python "
                           f"LRU's {want.tolist()}")

  def timed(fn, per=1):
    def measure():
      start = time.perf_counter()
      fn()
      return (time.perf_counter() - start) / per
    return measure

  result = timing.interleaved(
      {"python_lru": timed(lambda: python_lru(needed, config.capacity)),
       "replay": timed(one), "replay_many_per_capacity":
           timed(all_caps, per=len(many))},
      config.repeats, "python_lru", max_spread=config.max_spread,
      on_measure=lambda m: metrics.write(json.dumps(
          {"kind": "vs_python", **m}) + "\n"))
  for name in got:
    if not np.array_equal(got[name], want):
      raise AssertionError(f"{name} hits changed between repeats")
  out = {"many_capacities": many, "hits_equal": True, "variants": {}}
  for name in result.times:
    speedup = 1 / np.asarray(result.ratios[name].values)
    out["variants"][name] = {
        "median_s": result.times[name].median,
        "events_per_s": trace.num_events / result.times[name].median,
        # Python time / variant time, per repeat.
        "speedup_vs_python": {"median": float(np.median(speedup)),
                              "min": float(speedup.min()),
                              "max": float(speedup.max())}
        if result.ok(name) else None,
        "problem": result.problems[name]}
  return out


def table(summary: dict[str, Any]) -> str:
  """The results as a text table (policy, median s, events/s, hit rate)."""
  lines = [f"{'policy':8} {'median s':>9} {'events/s':>12} {'hit rate':>9}"]
  for name, r in summary["results"].items():
    rate = r.get("hit_rate")
    lines.append(f"{name:8} {r['median_s']:9.2f} {r['events_per_s']:12,.0f} "
                 f"{'-' if rate is None else f'{rate:.4f}':>9}")
  vs = summary.get("vs_python")
  if vs and "skipped" in vs:
    lines.append(f"\nno comparison with plain Python: {vs['skipped']}")
  elif vs:
    lines.append(f"\nLRU vs plain Python, interleaved (hits equal; "
                 f"replay_many: {len(vs['many_capacities'])} capacities, "
                 "time per capacity):")
    for name, v in vs["variants"].items():
      s = v["speedup_vs_python"]
      speed = (f"{s['median']:.2f}x [{s['min']:.2f}, {s['max']:.2f}]" if s
               else f"no figure ({v['problem']})")
      lines.append(f"  {name:26} {v['median_s']:8.3f} s "
                   f"{v['events_per_s']:12,.0f} events/s  {speed}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Times every policy's replay; returns the summary (prints as a table)."""
  if config.num_tokens % config.num_requests:
    raise ValueError(f"num_tokens={config.num_tokens} must be a multiple of "
                     f"num_requests={config.num_requests}.")
  reports.start_logging()
  policies = reports.split_names(config.policies)
  out = common.start(workdir, config)
  start = time.perf_counter()
  trace = synthetic.sticky(config.num_layers, config.num_experts,
                           config.top_k, config.num_requests,
                           config.num_tokens // config.num_requests,
                           config.batch, p_keep=config.p_keep,
                           seed=config.seed)
  batching = "single" if config.batch == 1 else "trace"
  num_steps = trace.num_tokens if batching == "single" else trace.num_steps
  logging.info("trace: %s, %d events, %d steps (%s batching), %.1f s",
               trace.source, trace.num_events, num_steps, batching,
               time.perf_counter() - start)
  # A warm-up trace with the same chunk shape: the first chunk's steps.
  chunk = replay.default_chunk_steps(num_steps, trace.num_layers,
                                     trace.num_experts)
  warm = trace.select(replay.step_ordinals(trace, batching) < chunk)
  all_options = config.policy_options.to_dict()

  results = {}
  with open(common.metrics_path(out), "w") as metrics:
    for policy in policies:
      options = all_options.get(policy)
      # num_slots = capacity: the buffer a server with this capacity holds.
      replay_once = lambda t, o=options, p=policy: replay.replay(
          t, p, config.capacity, policy_options=o, batching=batching,
          num_slots=config.capacity)
      started = time.perf_counter()
      replay_once(warm)
      warmup = time.perf_counter() - started
      kept = {}
      times = _time(lambda: kept.setdefault("r", replay_once(trace)),
                    config.repeats)
      median = statistics.median(times)
      results[policy] = {"seconds": times, "median_s": median,
                         "warmup_s": warmup,
                         "events_per_s": trace.num_events / median,
                         "steps_per_s": num_steps / median,
                         "hit_rate": kept["r"].hit_rate}
      metrics.write(json.dumps({"policy": policy, **results[policy]}) + "\n")
      logging.info("%-6s %8.2f s  %12s events/s  hit rate %.4f (warm-up "
                   "%.1f s)", policy, median,
                   f"{trace.num_events / median:,.0f}", kept["r"].hit_rate,
                   warmup)

  masks = replay.needed_masks(trace, batching)
  times = _time(lambda: mrc.mattson(masks), config.repeats)
  median = statistics.median(times)
  results["mattson"] = {"seconds": times, "median_s": median,
                        "events_per_s": trace.num_events / median,
                        "steps_per_s": num_steps / median,
                        "note": "every capacity 0..E at once (LRU)"}
  vs = None
  if config.get("vs_python", False):
    with open(common.metrics_path(out), "a") as metrics:
      vs = vs_python(trace, batching, config, metrics)
  summary = {
      "trace": {"source": trace.source, "num_layers": trace.num_layers,
                "num_experts": trace.num_experts, "top_k": trace.top_k,
                "num_tokens": trace.num_tokens, "batch": config.batch,
                "num_events": trace.num_events, "num_steps": num_steps,
                "batching": batching, "chunk_steps": chunk},
      "capacity": config.capacity, "repeats": config.repeats,
      "machine": reports.machine(),
      "results": results, "vs_python": vs}
  common.finish(out, summary)
  return reports.Report(summary, table(summary))
