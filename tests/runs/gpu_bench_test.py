"""Tests of wisp_jax/runs/gpu_bench.py on the CPU backend (tiny config)."""

import json

import numpy as np

import pytest

from wisp_jax import configs
from wisp_jax.runs import gpu_bench
from wisp_jax.sim import hardware

def _config():
  config = configs.get("gpu_bench", "tiny")
  config.copy_sizes_mib = (1, 2)
  config.copy_repeats = 2
  config.policies = ("lru",)
  config.expert_budget_fraction = 0.25  # 2 slots per layer: one capacity
  return config


@pytest.mark.long
def test_runs_on_cpu_and_writes_a_loadable_profile(tmp_path):
  summary = gpu_bench.run(_config(), tmp_path)
  assert summary["backend"] == "cpu"
  assert any("not PCIe" in note for note in summary["notes"])
  names = [m["name"] for m in summary["modes"]]
  assert names == ["resident", "static_offload", "transient", "paged_lru_S2"]
  modes = {m["name"]: m for m in summary["modes"]}
  one = summary["expert_bytes"]
  # Static offload keeps 2 experts of each of the 4 layers, streams 6 each.
  assert modes["static_offload"]["bytes_per_step"] == 4 * 6 * one
  assert modes["resident"]["bytes_per_step"] == 0
  assert all(m["predicted_tokens_per_s"] > 0 for m in modes.values())
  profile = hardware.get_profile(str(tmp_path / "hardware.json"))
  assert profile.h2d_bytes_per_s == pytest.approx(
      summary["copy_probe"]["bandwidth_bytes_per_s"])
  assert profile.h2d_source.startswith("measured")
  copies = summary["copy_probe"]["copies"]
  assert [c["bytes"] for c in copies] == [2**20, 2 * 2**20]
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == len(names) * 2
  # One line per measurement (a step time by difference of two runs: on a
  # busy CPU one can come out negative, which the summary then reports).
  records = [json.loads(line) for line in lines]
  assert {r["kind"] for r in records} == {"step_s"}
  assert {r["variant"] for r in records} == set(names)
  assert all(np.isfinite(r["value"]) for r in records)
  with pytest.raises(ValueError, match="does not exist"):
    hardware.get_profile(str(tmp_path / "missing.json"))
