"""Tests of wisp_jax/runs/decode.py on the tiny preset."""

import json

import ml_collections
import numpy as np

from wisp_jax.runs import decode


def test_tiny_sources_interleaved(tmp_path):
  config = ml_collections.ConfigDict({
      "model": "tiny", "dtype": "float32", "batch": 2, "prompt_bytes": 32,
      "short_tokens": 2, "long_tokens": 10, "repeats": 3, "max_spread": 50.0,
      "sources": [
          {"name": "resident", "experts": "resident"},
          {"name": "paged_E/2", "experts": "paged", "slots_per_layer": 3,
           "num_slots": 6},
          {"name": "paged_hit100", "experts": "paged", "slots_per_layer": 6,
           "hot_set": "all"}]})
  summary = decode.run(config, tmp_path)
  rows = {r["name"]: r for r in summary["results"]}
  resident_ms = np.array(rows["resident"]["step_ms_all"])
  if np.all(resident_ms > 0):
    assert rows["resident"]["vs_resident"]["median"] == 1.0
  assert rows["paged_hit100"]["decode_hit_rate"] == 1.0
  assert rows["paged_hit100"]["bytes_per_token"] == 0
  assert 0 < rows["paged_E/2"]["decode_hit_rate"] < 1
  assert rows["paged_E/2"]["bytes_per_token"] > 0
  # One metrics line per measurement, every source in every repeat.
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines()]
  assert len(lines) == 3 * 3
  assert {l["variant"] for l in lines} == set(rows)
  for row in rows.values():
    ratios = np.array(row["vs_resident"]["values"])
    times = np.array(row["step_ms_all"])
    resident = np.array(rows["resident"]["step_ms_all"])
    # A long-minus-short difference that came out non-positive on a loaded
    # machine leaves the row without ratios (nan), never with made-up ones.
    if np.all(times > 0) and np.all(resident > 0):
      np.testing.assert_allclose(ratios, times / resident)
    else:
      assert np.all(np.isnan(ratios))
      assert "no figure" in summary["table"]
  assert "x resident" in summary["table"]
  assert (tmp_path / "decode.png").stat().st_size > 0
