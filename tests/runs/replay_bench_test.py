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
  records = [json.loads(l) for l in lines]
  assert [r["policy"] for r in records if "policy" in r] == ["lru", "min"]
  # Then one line per measurement of the interleaved comparison.
  assert sum(r.get("kind") == "vs_python" for r in records) == 3 * (
      config.repeats)
  assert str(summary).splitlines()[0].split() == ["policy", "median", "s",
                                                  "events/s", "hit", "rate"]
  vs = summary["vs_python"]
  assert vs["hits_equal"] and vs["many_capacities"] == [2, 4, 6]
  assert set(vs["variants"]) == {"python_lru", "replay",
                                 "replay_many_per_capacity"}
  assert "LRU vs plain Python" in str(summary)


def test_python_lru_by_hand_and_as_the_pager():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from wisp_jax.sim import replay  # pylint: disable=g-import-not-at-top
  from wisp_jax.traces import synthetic  # pylint: disable=g-import-not-at-top
  steps = [{0, 1}, {2}, {0}, {1}, {2, 3}]
  masks = np.zeros((len(steps), 1, 4), bool)
  for t, s in enumerate(steps):
    masks[t, 0, list(s)] = True
  # Capacity 2: {2} evicts 1 (the higher id of the step-0 pair); 0 hits;
  # {1} evicts 2; {2, 3} evicts 0 and 1.
  assert replay_bench.python_lru(replay_bench.needed_lists(masks),
                                 2).tolist() == [1]
  trace = synthetic.sticky(3, 8, 2, 4, 64, 1, p_keep=0.7, seed=3)
  masks = replay.needed_masks(trace, "single")
  for capacity in (2, 3, 5):
    want = replay.replay(trace, "lru", capacity, batching="single").hits
    assert np.array_equal(replay_bench.python_lru(
        replay_bench.needed_lists(masks), capacity), want)


def test_batched_trace_skips_the_python_comparison(tmp_path):
  config = configs.get("replay_bench", "tiny")
  config.policies, config.batch, config.capacity = "lru", 4, 2
  summary = replay_bench.run(config, tmp_path)
  assert "fit" in summary["vs_python"]["skipped"]
