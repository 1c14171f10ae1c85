"""Tests of wisp_jax/runs/tier_split.py (tiny config)."""

import json

import pytest

from wisp_jax import configs
from wisp_jax.alloc import tiers
from wisp_jax.runs import tier_split
from wisp_jax.sim.hardware import get_profile


def test_tiny_compares_three_ways_with_two_at_equal_budgets(tmp_path):
  config = configs.get("tier_split", "tiny")
  summary = tier_split.run(config, tmp_path)
  rows = summary["rows"]
  specs = len(config.decoders) * len(config.hosts)
  cells = len(config.workloads) * len(config.shapes.tiny.budgets_gib)
  assert len(rows) == specs * cells
  for r in rows:
    two, three = r["two_way"], r["three_way"]
    assert r["gain"] == three["tokens_per_s"] / two["tokens_per_s"]
    assert two["total_tier"] == 0
    # Both splits hold the same pageable bytes, neither more.
    for split in (two, three):
      b = split["bytes"]
      assert b["raw_slots"] + b["tier"] + b["kv"] <= b["pageable"]
    assert two["bytes"]["pageable"] == three["bytes"]["pageable"]
    # The three-way options include every two-way split.
    assert r["gain"] >= 0.99
  # A decoder slower than the link never buys a tier on a raw host bank.
  link = get_profile(config.shapes.tiny.hardware).h2d_bytes_per_s
  slow = [r for r in rows if r["host"] == "raw" and r["decode_bytes_per_s"]
          < link]
  assert slow and all(r["three_way"]["total_tier"] == 0 for r in slow)
  assert any(r["three_way"]["total_tier"] > 0 for r in rows)
  c = summary["two_way_vs_solver"]
  assert c["worst"] >= 0.99
  assert "with a tier" in str(summary)
  assert (tmp_path / tier_split.PLOT).stat().st_size > 0
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["gain"] for l in lines] == [r["gain"] for r in rows]


def test_unknown_host_bank_is_refused():
  config = configs.get("tier_split", "tiny")
  config.hosts = ("raw", "zipped")
  with pytest.raises(ValueError, match="zipped"):
    tier_split._specs(config)  # pylint: disable=protected-access
  config.hosts = ("coded",)
  assert all(s.compressed_host and isinstance(s, tiers.TierSpec)
             for s in tier_split._specs(config).values())  # pylint: disable=protected-access
