"""Tests of wisp_jax/runs/simulate.py on the `tiny` config."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from wisp_jax.models.config import get_config as get_preset
from wisp_jax.runs import simulate
from wisp_jax.sim import cost, mrc
from wisp_jax.traces import synthetic

CONFIG_FILE = pathlib.Path(__file__).parents[2] / "configs" / "simulate.py"


def tiny_config():
  spec = importlib.util.spec_from_file_location("simulate_config",
                                                CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("simulate")
  config = tiny_config()
  return config, simulate.run(config, workdir), workdir


def test_outputs_written(tiny_run):
  config, summary, workdir = tiny_run
  assert json.loads((workdir / "summary.json").read_text()) == summary
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["policies"] == list(config.policies)
  assert saved["budget_bytes"] == list(config.budget_bytes)
  for name in ("hit_rate.png", "tokens_per_s.png"):
    data = (workdir / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  lines = [json.loads(line) for line in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  budgets = [line for line in lines if line["kind"] == "budget"]
  assert len(budgets) == len(config.budget_bytes)
  replays = [line for line in lines if line["kind"] == "replay"]
  assert {line["policy"] for line in replays} == set(config.policies)


def test_hit_rates_are_consistent(tiny_run):
  config, summary, _ = tiny_run
  assert summary["capacities"] == [2, 4, 6, 8]
  rates = {name: np.array(v) for name, v in summary["hit_rate"].items()}
  for name in config.policies:
    assert np.all(rates["min"] >= rates[name] - 1e-12), name
  assert np.all(np.diff(rates["lru"]) >= 0)  # LRU's inclusion property
  assert rates["min"][1] > rates["lru"][1]  # the oracle helps at 4 slots
  # Replayed LRU equals the Mattson curve at the replayed capacities.
  mattson = np.array(summary["mattson_lru_hit_rate"])
  np.testing.assert_allclose(rates["lru"], mattson[summary["capacities"]])
  # The same trace, redrawn: the curve agrees with mrc on it.
  s = config.synthetic
  model = get_preset("default")
  trace = synthetic.sticky(model.num_layers, model.num_experts, model.top_k,
                           s.num_requests, s.tokens_per_request, s.batch,
                           seed=s.seed, **s.options.to_dict())
  curve = mrc.mattson(trace)
  np.testing.assert_allclose(
      mattson, curve.hits.sum(axis=0) / curve.references.sum())


def test_modes_per_budget(tiny_run):
  config, summary, _ = tiny_run
  model = get_preset("default")
  all_experts = model.num_layers * model.num_experts * cost.expert_bytes(
      model)
  assert summary["model"]["all_experts_bytes_per_pass"] == all_experts
  rows = summary["budgets"]
  for row in rows:
    modes = row["modes"]
    # Static offload moves every expert of every layer on every pass.
    assert modes["static_offload"]["bytes_per_pass"] == all_experts
    assert modes["resident"]["bytes_per_pass"] == 0
    paged, static = modes["paged"], modes["static_offload"]
    if paged["fits"] and static["fits"]:
      for name, result in paged["policies"].items():
        if result["hit_rate"] > 0:
          assert result["tokens_per_s"] >= static["tokens_per_s"], name
        assert result["bytes_per_token"] < static["bytes_per_token"]
  # 2 MiB: nothing fits; 3 MiB: S = K = 2 slots; 6.5 MiB: resident fits and
  # paged gets every expert.
  assert [r["modes"]["paged"]["slots_per_layer"] for r in rows] == [0, 2, 4, 8]
  assert [r["modes"]["resident"]["fits"] for r in rows] == [
      False, False, False, True]
  assert rows[0]["modes"]["paged"]["tokens_per_s"] is None
  paged = [r["modes"]["paged"]["tokens_per_s"] for r in rows[1:]]
  assert paged == sorted(paged)  # more slots, fewer misses, faster


def test_static_offload_speed_equals_cost_model(tiny_run):
  config, summary, _ = tiny_run
  model = get_preset("default")
  s = config.synthetic
  trace = synthetic.sticky(model.num_layers, model.num_experts, model.top_k,
                           s.num_requests, s.tokens_per_request, s.batch,
                           seed=s.seed, **s.options.to_dict())
  needed = trace.needed_masks().sum(axis=(1, 2))
  seconds = sum(cost.step_cost(model, config.hardware, batch=s.batch,
                               context_len=config.context_len,
                               mode="static_offload",
                               needed_experts=int(n)).total_s for n in needed)
  want = trace.num_tokens / seconds
  got = summary["budgets"][-1]["modes"]["static_offload"]["tokens_per_s"]
  assert got == pytest.approx(want, rel=1e-9)


def test_trace_must_match_the_preset():
  preset = get_preset("default")  # L=4, E=8, K=2
  other_e = synthetic.uniform(4, 6, 2, 1, 3, 1)
  with pytest.raises(ValueError, match="E=6 experts .* has E=8"):
    simulate.model_for_trace(preset, other_e)
  other_lk = synthetic.uniform(2, 8, 3, 1, 3, 1)
  model, notes = simulate.model_for_trace(preset, other_lk)
  assert (model.num_layers, model.top_k) == (2, 3)
  assert model.expert_bytes() == preset.expert_bytes() and len(notes) == 1


def test_bad_config(tmp_path):
  config = tiny_config()
  config.policies = ("lru", "lfru")
  with pytest.raises(ValueError, match="Unknown paging policy 'lfru'"):
    simulate.run(config, tmp_path)
  config = tiny_config()
  config.paged_policy = "fifo"
  with pytest.raises(ValueError, match="paged_policy='fifo'"):
    simulate.run(config, tmp_path)
  config = tiny_config()
  config.trace = "no/such/trace.npz"
  with pytest.raises(ValueError, match="neither"):
    simulate.run(config, tmp_path)
  config = tiny_config()
  config.capacities = (0, 4)
  with pytest.raises(ValueError, match=r"capacities \[0\]"):
    simulate.run(config, tmp_path)
