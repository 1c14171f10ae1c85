"""Compile-time benchmark: trace, lower and compile seconds of the decode
step at several depths, resident and paged, in one run.

Every step is lowered from shapes (`serving.abstract`): nothing of model
size is allocated, so real widths run on a laptop. The layer loop keeps the
step's program constant in depth; `unrolled_layers` also times the
unrolled debugging variant at a few depths for reference. Each (depth,
source) is compiled `repeats` times, the depths interleaved within each
repeat, and the median is reported.

Targets (from the looped-layer design): paged compile at the deepest L <=
1.5 x paged compile at the shallowest L, and paged <= 2 x resident at every
L.
"""

from __future__ import annotations

import statistics
from typing import Any

import ml_collections
from absl import logging

from wisp_jax.models.config import get_config
from wisp_jax.runs import common
from wisp_jax.serving import abstract

PHASES = ("trace_s", "lower_s", "compile_s")


def _measure(config, preset, layers: int, experts: str, unroll: bool):
  model = preset.replace(num_layers=layers, unroll_layers=unroll)
  step = abstract.lower_decode_step(model, experts, config.batch,
                                    cache_len=config.cache_len)
  return {"layers": layers, "experts": experts, "unrolled": unroll,
          "hlo_lines": step.hlo_lines, "trace_s": step.trace_s,
          "lower_s": step.lower_s, "compile_s": step.compile_s,
          "temp_bytes": step.temp_bytes}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Times every (depth, source); writes summary.json and metrics.jsonl."""
  workdir = common.start(workdir, config)
  preset = get_config(config.model)
  cells = [(layers, experts, False) for layers in config.layers
           for experts in ("resident", "paged")]
  cells += [(layers, "paged", True) for layers in config.unrolled_layers]
  samples: dict[tuple, list[dict]] = {cell: [] for cell in cells}
  metrics = common.metrics(workdir)
  for repeat in range(config.repeats):
    order = cells[repeat % len(cells):] + cells[:repeat % len(cells)]
    for cell in order:
      row = _measure(config, preset, *cell)
      samples[cell].append(row)
      metrics.write({"repeat": repeat, **row})
      logging.info("L=%d %s%s: trace %.2f lower %.2f compile %.2f s, %d "
                   "HLO lines", row["layers"], row["experts"],
                   " (unrolled)" if row["unrolled"] else "", row["trace_s"],
                   row["lower_s"], row["compile_s"], row["hlo_lines"])
  metrics.close()
  rows = []
  for cell, runs in samples.items():
    row = dict(runs[0])
    for phase in PHASES:
      row[phase] = statistics.median(r[phase] for r in runs)
      row[phase + "_all"] = [r[phase] for r in runs]
    rows.append(row)
  looped = {(r["layers"], r["experts"]): r for r in rows if not r["unrolled"]}
  shallow, deep = min(config.layers), max(config.layers)
  depth_ratio = (looped[(deep, "paged")]["compile_s"] /
                 looped[(shallow, "paged")]["compile_s"])
  paged_vs_resident = {
      layers: looped[(layers, "paged")]["compile_s"] /
      looped[(layers, "resident")]["compile_s"] for layers in config.layers}
  summary = {
      "model": preset.name, "batch": config.batch, "rows": rows,
      "paged_deep_vs_shallow": depth_ratio,
      "paged_vs_resident": paged_vs_resident,
      "targets_met": {
          f"paged L={deep} <= 1.5 x L={shallow}": depth_ratio <= 1.5,
          "paged <= 2 x resident at every L": all(
              v <= 2 for v in paged_vs_resident.values())},
  }
  summary["table"] = table(summary)
  common.finish(workdir, summary)
  print(summary["table"])
  return summary


def table(summary: dict[str, Any]) -> str:
  lines = [f"{'L':>4} {'source':<18}{'trace s':>9}{'lower s':>9}"
           f"{'compile s':>11}{'HLO lines':>11}"]
  for r in summary["rows"]:
    name = r["experts"] + (" (unrolled)" if r["unrolled"] else "")
    lines.append(f"{r['layers']:>4} {name:<18}{r['trace_s']:>9.2f}"
                 f"{r['lower_s']:>9.2f}{r['compile_s']:>11.2f}"
                 f"{r['hlo_lines']:>11,}")
  lines.append(f"paged compile, deepest / shallowest L: "
               f"{summary['paged_deep_vs_shallow']:.2f}x")
  lines.append("paged / resident compile: " + ", ".join(
      f"L={l}: {v:.2f}x" for l, v in summary["paged_vs_resident"].items()))
  return "\n".join(lines)
