r"""Replay speed per policy and Mattson-curve time on a synthetic trace.

Single-stream (one token per step), OLMoE-like shape, 64K tokens = 1M
routing events (token x layer):

  .venv/bin/python experiments/replay_bench.py --workdir=workdirs/replay_bench

Batched decoding (8 requests per step, the trace's own steps):

  .venv/bin/python experiments/replay_bench.py --batch=8 \
      --workdir=workdirs/replay_bench_b8

Each policy is compiled and warmed up on the trace's first chunk of steps
(same compiled shapes), then timed `--repeats` times on the whole trace; the
median is reported. Prints a table and writes `workdir/summary.json`.
"""

import json
import os
import pathlib
import platform
import statistics
import time

import jax
from absl import app
from absl import flags
from absl import logging

from wisp_jax.sim import mrc, replay
from wisp_jax.traces import synthetic

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_LAYERS = flags.DEFINE_integer("num_layers", 16, "L.")
_EXPERTS = flags.DEFINE_integer("num_experts", 64, "E.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "K.")
_TOKENS = flags.DEFINE_integer("num_tokens", 65536, "Tokens in the trace.")
_BATCH = flags.DEFINE_integer(
    "batch", 1, "Requests per step; 1 replays single-stream ('single' "
    "batching), more replays the trace's steps ('trace' batching).")
_REQUESTS = flags.DEFINE_integer("num_requests", 64, "Requests in the trace.")
_CAPACITY = flags.DEFINE_integer("capacity", 16, "Slots per layer.")
_POLICIES = flags.DEFINE_list("policies", ["lru", "lfu", "fifo", "ws", "min"],
                              "Policies to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement.")
_P_KEEP = flags.DEFINE_float("p_keep", 0.8, "Sticky trace: keep probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Trace seed.")
flags.mark_flags_as_required(["workdir"])


def _time(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if _TOKENS.value % _REQUESTS.value:
    raise app.UsageError(f"--num_tokens={_TOKENS.value} must be a multiple "
                         f"of --num_requests={_REQUESTS.value}.")
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  trace = synthetic.sticky(_LAYERS.value, _EXPERTS.value, _TOP_K.value,
                           _REQUESTS.value, _TOKENS.value // _REQUESTS.value,
                           _BATCH.value, p_keep=_P_KEEP.value,
                           seed=_SEED.value)
  batching = "single" if _BATCH.value == 1 else "trace"
  num_steps = (trace.num_tokens if batching == "single"
               else trace.num_steps)
  logging.info("trace: %s, %d events, %d steps (%s batching), %.1f s",
               trace.source, trace.num_events, num_steps, batching,
               time.perf_counter() - start)
  # A warm-up trace with the same chunk shape: the first chunk's steps.
  chunk = replay.default_chunk_steps(num_steps, trace.num_layers,
                                     trace.num_experts)
  ordinals = replay.step_ordinals(trace, batching)
  warm = trace.select(ordinals < chunk)

  results = {}
  for policy in _POLICIES.value:
    options = {"lfu": {"age_every": 64}, "ws": {"tau": 8}}.get(policy)
    # num_slots = capacity: the buffer a server with this capacity holds.
    run = lambda t: replay.replay(t, policy, _CAPACITY.value,
                                  policy_options=options, batching=batching,
                                  num_slots=_CAPACITY.value)
    start = time.perf_counter()
    run(warm)
    warmup = time.perf_counter() - start
    out = {}
    times = _time(lambda: out.setdefault("r", run(trace)), _REPEATS.value)
    median = statistics.median(times)
    results[policy] = {"seconds": times, "median_s": median,
                       "warmup_s": warmup,
                       "events_per_s": trace.num_events / median,
                       "steps_per_s": num_steps / median,
                       "hit_rate": out["r"].hit_rate}
    logging.info("%-6s %8.2f s  %12s events/s  hit rate %.4f (warm-up "
                 "%.1f s)", policy, median,
                 f"{trace.num_events / median:,.0f}", out["r"].hit_rate,
                 warmup)

  masks = replay.needed_masks(trace, batching)
  times = _time(lambda: mrc.mattson(masks), _REPEATS.value)
  median = statistics.median(times)
  results["mattson"] = {"seconds": times, "median_s": median,
                        "events_per_s": trace.num_events / median,
                        "steps_per_s": num_steps / median,
                        "note": "every capacity 0..E at once (LRU)"}
  logging.info("%-6s %8.2f s  %12s events/s  (all capacities)", "mattson",
               median, f"{trace.num_events / median:,.0f}")

  summary = {
      "trace": {"source": trace.source, "num_layers": trace.num_layers,
                "num_experts": trace.num_experts, "top_k": trace.top_k,
                "num_tokens": trace.num_tokens, "batch": _BATCH.value,
                "num_events": trace.num_events, "num_steps": num_steps,
                "batching": batching, "chunk_steps": chunk},
      "capacity": _CAPACITY.value, "repeats": _REPEATS.value,
      "machine": {"backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()],
                  "cpu_count": os.cpu_count(),
                  "processor": platform.processor() or platform.machine(),
                  "load_average": list(os.getloadavg())},
      "results": results}
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(f"{'policy':8} {'median s':>9} {'events/s':>12} {'hit rate':>9}")
  for name, r in results.items():
    print(f"{name:8} {r['median_s']:9.2f} {r['events_per_s']:12,.0f} "
          f"{r.get('hit_rate', float('nan')):9.4f}")


if __name__ == "__main__":
  app.run(main)
