"""Tests of wisp_jax/runs/alloc_eval.py (tiny config)."""

import json

import numpy as np

from wisp_jax import configs
from wisp_jax.alloc import baselines, solver
from wisp_jax.runs import alloc_eval, allocate


def test_tiny_scores_equimarginal_against_the_oracle(tmp_path):
  config = configs.get("alloc_eval", "tiny")
  summary = alloc_eval.run(config, tmp_path)
  rows = summary["rows"]
  workloads = len(config.workloads)
  budgets = len(config.shapes.tiny.budgets_gib)
  assert len(rows) == 2 * workloads * budgets  # two profiles, one seed
  for r in rows:
    assert 0 < r["ratio"] <= 1 + 1e-9  # the oracle is the best split
    assert r["ratio"] == (r["equimarginal_tokens_per_s"]
                          / r["oracle_tokens_per_s"])
  ratios = [r["ratio"] for r in rows]
  assert summary["all"]["worst"] == min(ratios)
  assert summary["all"]["median"] == np.median(ratios)
  assert summary["worst_cell"]["ratio"] == min(ratios)
  assert "worst cell" in str(summary)
  assert (tmp_path / alloc_eval.PLOT).stat().st_size > 0
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["ratio"] for l in lines] == ratios


def test_one_cell_by_hand_and_reseeded_away_from_the_sweep():
  config = configs.get("alloc_eval", "tiny")
  name, wc = next(iter(config.workloads.items()))
  again = alloc_eval._reseeded(wc, 2)
  assert (again.seed, again.trace.seed) == (wc.seed + 2000,
                                            wc.trace.seed + 2000)
  assert wc.seed == 0  # the sweep's own draw is left alone
  shape = config.shapes.tiny
  run_config = {"model": shape.model, "hardware": "t4",
                "bytes_per_param": shape.bytes_per_param,
                "block_size": config.block_size,
                "workspace_gib": config.workspace_gib}
  import ml_collections  # pylint: disable=g-import-not-at-top
  run_config = ml_collections.ConfigDict(run_config)
  workload = allocate.build_workload(run_config, again, name=name)
  budget = allocate.budget_of(run_config, shape.budgets_gib[-1], workload)
  got = alloc_eval._score(workload, budget)
  assert got["equimarginal_tokens_per_s"] == solver.solve(
      workload, budget, method="marginal").tokens_per_s
  assert got["oracle_tokens_per_s"] == baselines.oracle(
      workload, budget).tokens_per_s
