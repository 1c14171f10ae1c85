"""Tests of wisp_jax/runs/allocate.py and alloc_sweep.py on the `tiny` configs."""

import json

import pytest

from wisp_jax import configs
from wisp_jax.runs import allocate
from wisp_jax.runs import alloc_sweep as sweep


def load_config(name: str, arg: str):
  return configs.get(name, arg)


def test_parse_groups():
  assert allocate.parse_groups("sticky:p_keep=0.9,alpha=1;zipf:alpha=0.2") == [
      {"kind": "sticky", "p_keep": 0.9, "alpha": 1.0},
      {"kind": "zipf", "alpha": 0.2}]
  assert allocate.parse_groups("uniform") == [{"kind": "uniform"}]
  with pytest.raises(ValueError, match="key=value"):
    allocate.parse_groups("sticky:p_keep")


def test_allocate_run_writes_summary(tmp_path):
  config = load_config("allocate", "tiny")
  summary = allocate.run(config, str(tmp_path))
  written = json.loads((tmp_path / "summary.json").read_text())
  assert written["split"] == summary["split"]
  assert (tmp_path / "config.json").exists()
  relative = written["relative_to_oracle"]
  assert relative["oracle"] == 1.0
  assert all(value <= 1.0 + 1e-9 for value in relative.values())
  assert relative["mv-wsa"] >= 0.97
  split = written["split"]
  assert len(split["slots_per_layer"]) == 2
  assert split["kv_blocks"] >= written["workload"]["floor_blocks"]
  # split.json: what serve and generate read.
  assert json.loads((tmp_path / "split.json").read_text()) == {
      "slots_per_layer": split["slots_per_layer"],
      "kv_blocks": split["kv_blocks"]}
  text = str(summary)
  assert "slots  " + "  ".join(map(str, split["slots_per_layer"])) in text
  assert f"{split['kv_blocks']} KV blocks" in text


def test_allocate_refuses_a_small_budget(tmp_path):
  config = load_config("allocate", "tiny")
  config.budget_gib = 20_000 / 2**30
  with pytest.raises(ValueError, match="cannot serve tiny"):
    allocate.run(config, str(tmp_path))


def test_sweep_run_writes_table_plots_and_targets(tmp_path):
  config = load_config("alloc_sweep", "tiny")
  config.budgets_gib = (60_000 / 2**30,)
  summary = sweep.run(config, str(tmp_path))
  assert len(summary["rows"]) == len(config.workloads)
  for name in ("table.md", "metrics.jsonl", "relative_to_oracle.png",
               "split_landscape.png", "slots_per_layer.png",
               "marginal_values.png"):
    assert (tmp_path / name).stat().st_size > 0
  targets = summary["targets"]
  assert targets["worst_mv_over_oracle"] <= 1.0 + 1e-9
  assert targets["mv_within_3pct_of_oracle_everywhere"] == (
      targets["worst_mv_over_oracle"] >= 0.97)
