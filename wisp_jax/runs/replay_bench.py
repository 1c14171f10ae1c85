"""Replay speed per policy and Mattson-curve time: `run(config, workdir)`.

See configs/replay_bench.py. Writes `config.json`, `metrics.jsonl` (one
line per policy) and `summary.json` (the trace, the machine and, per
policy, the timed seconds, routing events/s and hit rate) to `workdir`.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any

import ml_collections
from absl import logging

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.sim import mrc, replay
from wisp_jax.traces import synthetic


def _time(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def table(summary: dict[str, Any]) -> str:
  """The results as a text table (policy, median s, events/s, hit rate)."""
  lines = [f"{'policy':8} {'median s':>9} {'events/s':>12} {'hit rate':>9}"]
  for name, r in summary["results"].items():
    rate = r.get("hit_rate")
    lines.append(f"{name:8} {r['median_s']:9.2f} {r['events_per_s']:12,.0f} "
                 f"{'-' if rate is None else f'{rate:.4f}':>9}")
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
  summary = {
      "trace": {"source": trace.source, "num_layers": trace.num_layers,
                "num_experts": trace.num_experts, "top_k": trace.top_k,
                "num_tokens": trace.num_tokens, "batch": config.batch,
                "num_events": trace.num_events, "num_steps": num_steps,
                "batching": batching, "chunk_steps": chunk},
      "capacity": config.capacity, "repeats": config.repeats,
      "machine": reports.machine(),
      "results": results}
  common.finish(out, summary)
  return reports.Report(summary, table(summary))
