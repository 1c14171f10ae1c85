"""Tests of wisp_jax/runs/prefetch.py on the `tiny` config."""

import json

import pytest

from wisp_jax import configs
from wisp_jax.runs import prefetch

def tiny_config():
  return configs.get("prefetch", "tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("prefetch")
  config = tiny_config()
  return config, prefetch.run(config, workdir), workdir


def test_outputs_written(tiny_run):
  config, summary, workdir = tiny_run
  assert json.loads((workdir / "summary.json").read_text()) == summary
  assert json.loads((workdir / "config.json").read_text())["mode"] == "study"
  for name in ("accuracy_mixtral-8x7b.png", "bytes_mixtral-8x7b.png"):
    data = (workdir / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  lines = [json.loads(line) for line in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == len(summary["rows"])
  # 2 decode batches + 1 prefill; per policy: alone, cooccur, temporal and
  # 2 oracle accuracies; then MIN and MIN + perfect prefetch.
  per_workload = len(config.policies) * (1 + 2 + 2) + 2
  assert len(summary["rows"]) == 3 * per_workload


def test_rows_are_consistent(tiny_run):
  _, summary, _ = tiny_run
  rows = summary["rows"]
  key = lambda r: (r["workload"], r["policy"], r["predictor"], r["accuracy"])
  by = {key(r): r for r in rows}
  for r in rows:
    w = r["workload"]
    # MIN's demand hit rate bounds every policy without prefetch.
    if not r["predictor"]:
      assert by[(w, "min", "", None)]["hit_rate"] >= r["hit_rate"] - 1e-12
    # Prefetching only adds copies to the bytes moved of no prefetch, or
    # replaces demand ones; useful + wasted never exceed the copies.
    assert r["useful"] + r["wasted"] <= r["prefetch_loads"]
    for profile, rate in r["tokens_per_s"].items():
      # The timeline lies between every copy serial and every copy hidden.
      assert (r["tokens_per_s_serial"][profile] * (1 - 1e-9) <= rate
              <= r["tokens_per_s_bound"][profile] * (1 + 1e-9))
    if r["predictor"] == "oracle" and r["accuracy"] == 1.0:
      assert r["precision"] == 1.0
  bound = by[("mixtral-8x7b/sticky/B1", "min", "oracle", 1.0)]
  plain = by[("mixtral-8x7b/sticky/B1", "min", "", None)]
  assert bound["tokens_per_s"]["rtx3090"] > plain["tokens_per_s"]["rtx3090"]
  assert set(summary["headline"]["gap_closed"]) == {"lrfu"}
