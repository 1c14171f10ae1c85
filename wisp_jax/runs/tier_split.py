"""The three-way split (raw slots, compressed tier, KV) vs the two-way one.

`run(config, workdir)`; see configs/tier_split.py. Every cell (shape x
workload x seed x budget x decoder x host bank) splits the same budget two
ways on the throughput model (`alloc.tiers`):

  * two-way: raw slots and KV (`tiers.equimarginal(allow_tier=False)`),
    on the same host bank (raw, or coded: copies cross at 1 / ratio of
    their bytes and are decoded on arrival), by the same steps;
  * three-way: raw slots, a tier of experts kept coded in device memory
    (planned as each layer's most-missed experts at its raw slots), and KV.

The ratio three-way / two-way is the tier's gain at equal device bytes. The
two-way split on a raw host bank is also checked against the shipped
two-way solver (`solver.solve(method="marginal")`), which it should match.
Workloads are the sweep's, drawn with seeds the solvers were not developed
on (`alloc_eval`'s reseeding); nothing in the three-way split is tuned.

Writes `config.json`, `metrics.jsonl` (one line per cell), `summary.json`
(per decoder x host x shape: worst, median and best gain, and the cells
whose split buys a tier) and `tier_gain.png`.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from wisp_jax.alloc import solver
from wisp_jax.alloc import throughput
from wisp_jax.alloc import tiers
from wisp_jax.models import config as config_lib
from wisp_jax.runs import alloc_eval
from wisp_jax.runs import allocate
from wisp_jax.runs import common
from wisp_jax.runs import reports

PLOT = "tier_gain.png"
HOSTS = ("raw", "coded")


def _specs(config) -> dict[tuple[str, str], tiers.TierSpec]:
  hosts = reports.split_names(config.hosts)
  unknown = sorted(set(hosts) - set(HOSTS))
  if unknown:
    raise ValueError(f"unknown host bank(s) {unknown}; use {HOSTS}.")
  return {(name, host): tiers.TierSpec(float(config.ratio), float(rate),
                                       compressed_host=host == "coded")
          for name, rate in config.decoders.items() for host in hosts}


def _score(workload, budget, specs) -> dict[str, Any]:
  plain = solver.solve(workload, budget, method="marginal")
  out = {"two_way_solver_tokens_per_s": plain.tokens_per_s, "cells": {}}
  # Without a tier only a host copy's price matters (a raw host bank's is
  # the same for every decoder): one two-way split per price.
  two_way = {}
  for (decoder, host), spec in specs.items():
    price = spec.factors(workload)[0]
    if price not in two_way:
      two_way[price] = tiers.equimarginal(workload, budget, spec,
                                          allow_tier=False)
    two = two_way[price]
    three = tiers.equimarginal(workload, budget, spec)
    out["cells"][f"{decoder}/{host}"] = {
        "decoder": decoder, "host": host,
        "decode_bytes_per_s": spec.decode_bytes_per_s,
        "two_way": two.to_dict(), "three_way": three.to_dict(),
        "gain": three.tokens_per_s / two.tokens_per_s,
        "tier_share_of_bytes": three.bytes["tier"] / three.bytes["pageable"]}
  return out


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
  gains = np.array([r["gain"] for r in rows])
  return {"cells": int(gains.size), "worst": float(gains.min()),
          "median": float(np.median(gains)), "best": float(gains.max()),
          "with_tier": int(sum(r["three_way"]["total_tier"] > 0
                               for r in rows))}


def run(config: ml_collections.ConfigDict, workdir: str) -> reports.Report:
  """Runs the comparison; returns the summary (prints as its table)."""
  reports.start_logging()
  out = common.start(workdir, config)
  specs = _specs(config)
  rows, checks = [], []
  with open(common.metrics_path(out), "w") as metrics:
    for shape in config.shapes.values():
      model = config_lib.get_config(shape.model)
      run_config = ml_collections.ConfigDict({
          "model": shape.model, "hardware": shape.hardware,
          "bytes_per_param": shape.bytes_per_param,
          "block_size": config.block_size,
          "workspace_gib": config.workspace_gib})
      for name, seed, wc in alloc_eval._cells(config):  # pylint: disable=protected-access
        curves = allocate.build_curves(wc.trace, model)
        workload = allocate.build_workload(run_config, wc, curves, name=name)
        for gib in shape.budgets_gib:
          budget = allocate.budget_of(run_config, float(gib), workload)
          try:
            budget.check(workload)
          except throughput.BudgetError as e:
            logging.warning("%s %s seed %d at %s refused: %s", shape.model,
                            name, seed, reports.format_bytes(
                                float(gib) * 2**30), e)
            continue
          scored = _score(workload, budget, specs)
          where = {"model": shape.model, "hardware": shape.hardware,
                   "workload": name, "seed": seed, "budget_gib": float(gib)}
          raw_two = [c for c in scored["cells"].values()
                     if c["host"] == "raw"]
          if raw_two:
            checks.append(raw_two[0]["two_way"]["tokens_per_s"]
                          / scored["two_way_solver_tokens_per_s"])
          for cell in scored["cells"].values():
            row = {**where, **cell}
            rows.append(row)
            metrics.write(json.dumps(row) + "\n")
            logging.info("%-13s %-16s %8s %s/%s: three-way %.4fx the "
                         "two-way split (tier %d experts)", shape.model,
                         name, reports.format_bytes(float(gib) * 2**30),
                         cell["decoder"], cell["host"], cell["gain"],
                         cell["three_way"]["total_tier"])
  if not rows:
    raise ValueError("every cell's budget was refused; raise budgets_gib.")
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    key = (f"{r['model']} / {r['hardware']}, decoder {r['decoder']} "
           f"({r['decode_bytes_per_s'] / 1e9:g} GB/s), {r['host']} host")
    groups.setdefault(key, []).append(r)
  summary = {"ratio": float(config.ratio),
             "groups": {k: _stats(v) for k, v in groups.items()},
             "two_way_vs_solver": {"worst": float(min(checks)),
                                   "best": float(max(checks))},
             "rows": rows}
  common.finish(out, summary)
  _plot(rows, out / PLOT)
  return reports.Report(summary, table(summary))


def table(summary: dict[str, Any]) -> str:
  lines = [reports.text_table(
      ["shape, decoder, host bank", "cells", "worst", "median", "best",
       "with a tier"],
      [[k, s["cells"], f"{s['worst']:.4f}", f"{s['median']:.4f}",
        f"{s['best']:.4f}", s["with_tier"]]
       for k, s in summary["groups"].items()])]
  c = summary["two_way_vs_solver"]
  lines.append(f"three-way / two-way tokens/s at equal budget, codec ratio "
               f"{summary['ratio']:g}; the two-way split (raw host) is "
               f"{c['worst']:.4f}-{c['best']:.4f}x the shipped two-way "
               "solver's")
  return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path) -> None:
  groups: dict[str, list[float]] = {}
  for r in rows:
    groups.setdefault(f"{r['model']}\n{r['decoder']}, {r['host']} host",
                      []).append(r["gain"])
  reports.strip_plot(groups, path, ylabel="three-way / two-way tokens/s",
                     title="A compressed device tier at equal budget (model)",
                     lines=[(1.0, "0.5", "-", "two-way split")])
