"""Tests of wisp_jax/runs/replay_bench.py on the `tiny` config."""

import json

from wisp_jax import configs
from wisp_jax.runs import replay_bench


def test_tiny_run_times_every_policy_and_writes_its_workdir(tmp_path):
  config = configs.get("replay_bench", "tiny")
  config.policies = "lru,min"
  summary = replay_bench.run(config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["policies"] == (
      "lru,min")
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  results = summary["results"]
  assert set(results) == {"lru", "min", "mattson"}
  assert results["min"]["hit_rate"] >= results["lru"]["hit_rate"]
  assert summary["trace"]["num_events"] == 256 * 2
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["policy"] for l in lines] == ["lru", "min"]
  assert str(summary).splitlines()[0].split() == ["policy", "median", "s",
                                                  "events/s", "hit", "rate"]
