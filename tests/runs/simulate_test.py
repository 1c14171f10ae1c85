"""Tests of wisp_jax/runs/simulate.py on the `tiny` config."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from wisp_jax import configs

from wisp_jax.models.config import get_config as get_preset
from wisp_jax.runs import simulate
from wisp_jax.sim import cost, mrc
from wisp_jax.traces import synthetic

def tiny_config():
  return configs.get("simulate", "tiny")


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
  one = cost.expert_bytes(model)
  all_experts = model.num_layers * model.num_experts * one
  assert summary["model"]["all_experts_bytes_per_pass"] == all_experts
  rows = summary["budgets"]
  kv = rows[0]["kv_reserve_bytes"]
  for row in rows:
    modes, plan = row["modes"], row["plan"]
    # Everything the budget holds after dense weights and the KV reserve.
    left = row["budget_bytes"] - cost.dense_bytes(model) - kv
    assert plan["expert_bytes_budget"] == left
    kept = min(left // one, model.num_layers * model.num_experts)
    assert plan["resident_experts"] == modes["static_offload"][
        "resident_experts"] == kept
    # Static offload at this budget streams what it does not keep; layer
    # offload streams every expert of every layer.
    assert modes["static_offload"]["bytes_per_pass"] == all_experts - kept * one
    assert modes["layer_offload"]["bytes_per_pass"] == all_experts
    assert modes["resident"]["bytes_per_pass"] == 0
    paged = modes["paged"]
    if paged["fits"]:
      slots = np.array(paged["slots_per_layer"])
      # The slots use the whole expert budget (less than one expert left,
      # or every layer full) and every layer can hold one token's experts.
      assert slots.sum() * one <= left
      assert left - slots.sum() * one < one or slots.min() == model.num_experts
      assert slots.min() >= model.top_k and slots.max() - slots.min() <= 1
      assert row["paged_vs_static_offload"] == pytest.approx(
          paged["tokens_per_s"] / modes["static_offload"]["tokens_per_s"])
  # 2 MiB: paged cannot run (fewer than K slots per layer) but static
  # offload can; 6.5 MiB: the whole model is resident.
  assert [r["modes"]["paged"]["fits"] for r in rows] == [False, True, True,
                                                        True]
  assert rows[0]["modes"]["paged"]["tokens_per_s"] is None
  assert rows[0]["modes"]["static_offload"]["tokens_per_s"] > 0
  assert [r["modes"]["resident"]["fits"] for r in rows] == [
      False, False, False, True]
  paged = [r["modes"]["paged"]["tokens_per_s"] for r in rows[1:]]
  assert paged == sorted(paged)  # more slots, fewer misses, faster
  assert "cannot run" in summary["table"].splitlines()[1]


def test_offload_speeds_equal_cost_model(tiny_run):
  config, summary, _ = tiny_run
  model = get_preset("default")
  s = config.synthetic
  trace = synthetic.sticky(model.num_layers, model.num_experts, model.top_k,
                           s.num_requests, s.tokens_per_request, s.batch,
                           seed=s.seed, **s.options.to_dict())
  needed = trace.needed_masks().sum(axis=(1, 2))
  for row in summary["budgets"]:
    for mode in ("layer_offload", "static_offload"):
      kept = row["plan"]["resident_experts"] if mode == "static_offload" else 0
      seconds = sum(cost.step_cost(
          model, config.hardware, batch=s.batch,
          context_len=config.context_len, mode=mode, resident_experts=kept,
          needed_experts=int(n)).total_s for n in needed)
      got = row["modes"][mode]["tokens_per_s"]
      assert got == pytest.approx(trace.num_tokens / seconds, rel=1e-9)


def test_budget_and_width_checks(tmp_path):
  config = tiny_config()
  config.budget_bytes = (64 * 2**30,)  # above the rtx3090's 24 GiB
  with pytest.raises(ValueError, match="exceed rtx3090's 24 GiB"):
    simulate.run(config, tmp_path)
  config.allow_oversize = True
  summary = simulate.run(config, tmp_path)
  assert any("whole model resident" in n for n in summary["notes"])
  config = tiny_config()
  config.expert_bytes_per_param = 3.0
  with pytest.raises(ValueError, match="expert_bytes_per_param=3.0"):
    simulate.run(config, tmp_path)
  # int4 experts: a quarter of the bf16 bytes per expert.
  config.expert_bytes_per_param = 0.5
  summary = simulate.run(config, tmp_path)
  assert summary["model"]["expert_bytes"] * 4 == cost.expert_bytes(
      get_preset("default"))
  # Budgets as a command-line string.
  fields = tiny_config().to_dict()
  fields["budget_bytes"] = "3MiB,4MiB"
  config = ml_collections.ConfigDict(fields)
  summary = simulate.run(config, tmp_path)
  assert [r["budget_bytes"] for r in summary["budgets"]] == [3 * 2**20,
                                                             4 * 2**20]


def test_imported_trace_gets_phases(tmp_path):
  model = get_preset("default")
  trace = synthetic.sticky(model.num_layers, model.num_experts, model.top_k,
                           4, 12, 4, seed=1)
  # An imported log: no phases, and a 6-token prefill step per request.
  unknown = dataclasses.replace(trace, phase=np.full_like(trace.phase, -1))
  first = trace.select(trace.step == trace.step.min())
  prefill = dataclasses.replace(
      first.select(np.repeat(np.arange(first.num_tokens), 6)),
      phase=np.full(first.num_tokens * 6, -1, np.int8))
  merged = dataclasses.replace(
      unknown, **{f: np.concatenate([getattr(prefill, f),
                                     getattr(unknown, f)[first.num_tokens:]])
                  for f in ("step", "request", "phase", "position", "ids",
                            "weights")})
  path = tmp_path / "imported.npz"
  merged.save(path)
  config = tiny_config()
  config.trace = str(path)
  summary = simulate.run(config, tmp_path / "run")
  assert any("no phase" in n for n in summary["notes"])
  # The prefill step is not timed: decode steps are the trace's others.
  assert summary["trace"]["decode_steps"] == summary["trace"]["num_steps"] - 1
  assert summary["trace"]["max_decode_batch"] == 4


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


def test_compressed_bank_and_tier_modes(tmp_path):
  config = tiny_config()
  config.compression.ratio = 1.5
  config.compression.decode_bytes_per_s = 1e11
  summary = simulate.run(config, tmp_path)
  model = get_preset("default")
  one = cost.expert_bytes(model)
  assert "paged+zbank" in summary["table"]
  for row in summary["budgets"]:
    modes = row["modes"]
    paged, bank, tier = (modes["paged"], modes["paged_compressed_bank"],
                         modes["paged_compressed_tier"])
    assert bank["fits"] == tier["fits"] == paged["fits"]
    if not paged["fits"]:
      continue
    # The bank keeps paged's slots and moves the same experts, compressed.
    assert bank["slots_per_layer"] == paged["slots_per_layer"]
    assert bank["bytes_per_pass"] == pytest.approx(
        paged["bytes_per_pass"] / 1.5)
    # The tier's bytes hold 1.5x the slots (at most E), so it hits more.
    assert tier["slots_per_layer"] == [
        min(int(c * 1.5), model.num_experts) for c in paged["slots_per_layer"]]
    assert tier["hit_rate"] >= paged["hit_rate"]
    assert tier["decoded_per_pass"] > 0 and one > 0
  with pytest.raises(ValueError, match="decode_bytes_per_s > 0"):
    config.compression.decode_bytes_per_s = 0.0
    simulate.run(config, tmp_path / "refused")
