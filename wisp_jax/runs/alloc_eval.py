"""MV-WSA alone vs the exact oracle on workloads the solver never saw.

`run(config, workdir)`; see configs/alloc_eval.py. The shipped sweep
(configs/alloc_sweep.py) is where the solver was developed, so its cells
are in-sample. Here every sweep workload is drawn again with other seeds
(request lengths and routing trace), for other model shapes and other
hardware profiles, and each cell (shape x profile x seed x workload x
budget) scores two splits on the throughput model:

  * `solver.equimarginal`: MV-WSA proper, the marginal values alone, no
    search on the objective (`solve(method="marginal")`);
  * `baselines.oracle`: the exact per-layer knapsack over every
    (max batch, KV) pair, the best split the model allows.

Writes `config.json`, `metrics.jsonl` (one line per cell), `summary.json`
(worst and median ratio per shape x profile and over all cells, and the
worst cell) and `equimarginal_vs_oracle.png` (the ratio of every cell).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.alloc import baselines
from wisp_jax.alloc import solver
from wisp_jax.alloc import throughput
from wisp_jax.models import config as config_lib
from wisp_jax.runs import allocate
from wisp_jax.runs import common
from wisp_jax.runs import reports


def _reseeded(workload_config, seed: int) -> ml_collections.ConfigDict:
  """The workload with its length sample and routing trace drawn anew."""
  wc = copy.deepcopy(workload_config)
  wc.seed = int(wc.seed) + 1000 * seed
  wc.trace.seed = int(wc.trace.seed) + 1000 * seed
  return wc


def _cells(config) -> list[tuple[Any, ...]]:
  """(workload name, seed, workload config) for every seed."""
  return [(name, seed, _reseeded(wc, seed))
          for seed in config.seeds for name, wc in config.workloads.items()]


def _score(workload, budget) -> dict[str, Any]:
  mv = solver.solve(workload, budget, method="marginal")
  best = baselines.oracle(workload, budget)
  return {"equimarginal_tokens_per_s": mv.tokens_per_s,
          "oracle_tokens_per_s": best.tokens_per_s,
          "ratio": mv.tokens_per_s / best.tokens_per_s,
          "equimarginal_split": {"total_slots": mv.split.total_slots,
                                 "kv_blocks": mv.split.kv_blocks},
          "oracle_split": {"total_slots": best.split.total_slots,
                           "kv_blocks": best.split.kv_blocks}}


def _stats(values: list[float]) -> dict[str, Any]:
  v = np.asarray(values)
  return {"cells": int(v.size), "worst": float(v.min()),
          "median": float(np.median(v)),
          "within_3pct": int(np.sum(v >= 0.97))}


def run(config: ml_collections.ConfigDict, workdir: str) -> reports.Report:
  """Runs the evaluation; returns the summary (prints as its table)."""
  reports.start_logging()
  out = common.start(workdir, config)
  rows = []
  with open(common.metrics_path(out), "w") as metrics:
    for shape in config.shapes.values():
      model = config_lib.get_config(shape.model)
      for hardware in reports.split_names(shape.hardware):
        run_config = ml_collections.ConfigDict({
            "model": shape.model, "hardware": hardware,
            "bytes_per_param": shape.bytes_per_param,
            "block_size": config.block_size,
            "workspace_gib": config.workspace_gib})
        for name, seed, wc in _cells(config):
          curves = allocate.build_curves(wc.trace, model)
          workload = allocate.build_workload(run_config, wc, curves,
                                             name=name)
          for gib in shape.budgets_gib:
            budget = allocate.budget_of(run_config, float(gib), workload)
            try:
              budget.check(workload)
            except throughput.BudgetError as e:
              logging.warning("%s/%s %s seed %d at %s refused: %s",
                              shape.model, hardware, name, seed,
                              reports.format_bytes(float(gib) * 2**30), e)
              continue
            row = {"model": shape.model, "hardware": hardware,
                   "workload": name, "seed": seed, "budget_gib": float(gib),
                   **_score(workload, budget)}
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            logging.info("%-14s %-9s %-16s seed %d %9s: MV-WSA %.4f of "
                         "the oracle", shape.model, hardware, name, seed,
                         reports.format_bytes(float(gib) * 2**30),
                         row["ratio"])
  if not rows:
    raise ValueError("every cell's budget was refused; raise budgets_gib.")
  groups: dict[str, list[float]] = {}
  for r in rows:
    groups.setdefault(f"{r['model']} / {r['hardware']}", []).append(
        r["ratio"])
  worst = min(rows, key=lambda r: r["ratio"])
  summary = {"groups": {k: _stats(v) for k, v in groups.items()},
             "all": _stats([r["ratio"] for r in rows]),
             "worst_cell": {k: worst[k] for k in (
                 "model", "hardware", "workload", "seed", "budget_gib",
                 "ratio")},
             "rows": rows}
  common.finish(out, summary)
  _plot(rows, out / PLOT)
  return reports.Report(summary, table(summary))


PLOT = "equimarginal_vs_oracle.png"


def table(summary: dict[str, Any]) -> str:
  lines = [reports.text_table(
      ["shape / hardware", "cells", "worst", "median", "within 3%"],
      [[k, s["cells"], f"{s['worst']:.4f}", f"{s['median']:.4f}",
        s["within_3pct"]]
       for k, s in list(summary["groups"].items()) + [
           ("all", summary["all"])]])]
  w = summary["worst_cell"]
  lines.append(f"worst cell: {w['model']} / {w['hardware']} {w['workload']} "
               f"seed {w['seed']} at "
               f"{reports.format_bytes(w['budget_gib'] * 2**30)}: "
               f"{w['ratio']:.4f} of the oracle")
  return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path) -> None:
  groups: dict[str, list[float]] = {}
  for r in rows:
    groups.setdefault(f"{r['model']}\n{r['hardware']}", []).append(
        r["ratio"])
  low = min(0.95, min(r["ratio"] for r in rows) - 0.01)
  reports.strip_plot(
      groups, path, ylabel="MV-WSA / oracle tokens/s", ylim=(low, 1.005),
      title="MV-WSA alone (no search) vs the exact oracle, held-out seeds, "
      "shapes and profiles",
      lines=[(0.97, "C3", "--", "3% below the oracle"),
             (1.0, "0.5", "-", "oracle")])
