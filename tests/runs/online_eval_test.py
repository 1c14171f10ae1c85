"""Tests of wisp_jax/runs/online_eval.py: intervals, streams, the priced
clock and a small end-to-end evaluation (the tiny model, a few requests)."""

import json
import math

import numpy as np
import pytest

from wisp_jax import configs
from wisp_jax.runs import online_eval
from wisp_jax.sim.hardware import get_profile


def test_mean_interval_by_hand():
  got = online_eval.mean_interval([1.0, 2.0, 3.0])
  # mean 2, sample std 1, t(0.975, 2 dof) = 4.303.
  half = 4.303 / math.sqrt(3)
  assert got["mean"] == 2.0 and got["n"] == 3
  assert got["low"] == pytest.approx(2 - half)
  assert got["high"] == pytest.approx(2 + half)
  one = online_eval.mean_interval([1.5])
  assert one["low"] == one["high"] == 1.5
  with pytest.raises(ValueError, match="at least one"):
    online_eval.mean_interval([])


def test_stream_is_open_loop_and_phase_ordered():
  config = configs.get("online_eval", "tiny")
  phases = online_eval.scenario_phases(config, "chat,burst")
  seeds = online_eval.phase_seeds(11, 2)
  stream = online_eval.make_stream(phases, 256, seeds, 1e-4)
  again = online_eval.make_stream(phases, 256, seeds, 1e-4)
  times = [at for _, at, _ in stream]
  assert times == [at for _, at, _ in again]  # fixed before serving
  assert np.all(np.diff(times) > 0)
  which = [p for _, _, p in stream]
  assert which == sorted(which)  # phase 1's arrivals follow phase 0's
  assert which.count(0) == phases[0].num_requests
  # Phase 1 alone (its own seed) draws the same requests and gaps.
  alone = online_eval.make_stream(phases[1:], 256, seeds[1:], 1e-4)
  first = times[which.index(1) - 1]
  assert [at + first for _, at, _ in alone] == pytest.approx(
      [at for _, at, p in stream if p == 1])
  later = [r.prompt for r, _, p in stream if p == 1]
  assert len(alone) == len(later)
  assert all(np.array_equal(r.prompt, prompt)
             for (r, _, _), prompt in zip(alone, later))
  with pytest.raises(ValueError, match="unknown phase types"):
    online_eval.scenario_phases(config, "chat,nope")


def test_resize_seconds_by_hand():
  hw = get_profile("rtx3090")
  entry = {"kv_blocks": 30, "from": {"kv_blocks": 20},
           "slots_moved": [1, 2]}
  got = online_eval.resize_seconds(entry, hw, expert_bytes=1000,
                                   block_bytes=100)
  assert got == pytest.approx((30 * 100 + 3 * 1000) / hw.hbm_bytes_per_s)
  same_kv = dict(entry, kv_blocks=20)
  assert online_eval.resize_seconds(same_kv, hw, 1000, 100) == (
      pytest.approx(3000 / hw.hbm_bytes_per_s))


def _small_config():
  # Short prompts only (few prefill shapes to compile): tuning on
  # burst-then-chat, evaluation on chat-then-burst.
  config = configs.get("online_eval", "tiny")
  for phase in config.phase_types.values():
    phase.num_requests = 3
  config.fixed_slots = (2, 6)
  config.tuning = "burst,chat"
  config.scenarios = {"chat_burst": "chat,burst"}
  config.evaluate = "chat_burst"
  config.tuning_seeds = "0"
  config.seeds = "11"
  return config


def test_end_to_end_small(tmp_path):
  config = _small_config()
  report = online_eval.run(config, tmp_path)
  summary = report
  assert summary["tuning"]["chosen"] in ("fixed-2", "fixed-6")
  s = summary["scenarios"]["chat_burst"]
  speed = s["tokens_per_s"]
  for rule in ("step_curve@inline", "step_curve@behind"):
    r = s["controllers"][rule]
    # The ratios are those of the per-seed throughputs in metrics.jsonl.
    assert r["over_best_fixed_in_hindsight"]["n"] == 1
    assert r["decision_s_share"] >= 0 and r["resize_s_share"] >= 0
  assert s["best_fixed_in_hindsight"] == max(
      ("fixed-2", "fixed-6"), key=lambda n: speed[n]["mean"])
  lines = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  runs = {(tuple(l["seeds"]), l["configuration"], l["scenario"]): l
          for l in lines}
  seeds = online_eval.phase_seeds(11, 2)
  # Settings chosen on the tuning scenario are the ones evaluated.
  tuning = summary["tuning"]["controllers"]["step_curve@inline"]
  assert len(tuning["tried"]) == 2  # dead_zone 0.1 and 0.3
  assert tuning["chosen"] == max(tuning["tried"], key=lambda t: t[
      "tokens_per_s"])["settings"]
  inline = runs[(seeds, "step_curve@inline", "chat,burst")]
  assert inline["settings"] == tuning["chosen"]
  behind = runs[(seeds, "step_curve@behind", "chat,burst")]
  fixed = runs[(seeds, "fixed-2", "chat,burst")]
  # Every configuration serves the same requests to the end.
  assert inline["tokens"] == behind["tokens"] == fixed["tokens"]
  assert sum(fixed["phase_tokens"]) == fixed["tokens"]
  # Fixed splits never resize; behind-decisions cost the clock nothing.
  assert fixed["resizes"] == 0 and fixed["decision_s"] == 0
  assert behind["decision_s"] == 0
  assert inline["decision_s"] > 0 and behind["decision_off_path_s"] > 0
  assert fixed["decisions"] == 0 and behind["decisions"] >= 1
  assert s["controllers"]["step_curve@behind"]["ms_per_decision"] == (
      pytest.approx(1e3 * behind["decision_off_path_s"] /
                    behind["decisions"]))
  # The oracle switches where the best split of the phase changes.
  oracle = runs[(seeds, "oracle", "chat,burst")]
  assert oracle["resizes"] <= 1
  want = (behind["tokens_per_s"] /
          runs[(seeds, s["best_fixed_in_hindsight"], "chat,burst")][
              "tokens_per_s"])
  assert s["controllers"]["step_curve@behind"][
      "over_best_fixed_in_hindsight"]["mean"] == pytest.approx(want)
  assert "chat_burst" in report.text


def test_tuning_seeds_must_be_held_out(tmp_path):
  config = _small_config()
  config.seeds = "0"
  with pytest.raises(ValueError, match="evaluation seeds must be held out"):
    online_eval.run(config, tmp_path)


def test_unknown_decision_mode():
  with pytest.raises(ValueError, match="decision must be one of"):
    online_eval.serve_open_loop(None, configs.get("online_eval", "tiny"),
                                None, [], None, None, None, 1, "later")


def test_default_preset_budget_gives_the_documented_splits():
  """`:default` leaves caps 4, 6, 8 with 182, 110, 38 KV blocks; at 8 the
  pool holds fewer than 3 of the longest `long` requests, at 6 seven of
  them (the max batch is 8)."""
  from wisp_jax.runs import online, serve  # pylint: disable=g-import-not-at-top
  config = configs.get("online_eval", "default")
  model, _ = serve.load_model(config)
  budget = online.make_budget(config, model)
  blocks = {s: budget.max_kv_blocks(s) for s in config.fixed_slots}
  assert blocks == {4: 182, 6: 110, 8: 38}
  long = config.phase_types.long
  longest = math.ceil((long.prompt_len_max + long.max_new_tokens_max)
                      / config.engine.block_size)
  assert blocks[8] < 3 * longest
  assert blocks[6] >= 7 * longest
  assert config.controller.kv_granule * budget.footprint.block_bytes == (
      model.config.num_layers * budget.footprint.expert_bytes)


def test_free_decisions_cost_the_clock_nothing():
  """The counterfactual "free" decides as inline does and adds no time;
  nor does the switching oracle's schedule."""
  from wisp_jax.runs import online, serve  # pylint: disable=g-import-not-at-top
  from wisp_jax.serving.budget import Split  # pylint: disable=g-import-not-at-top
  config = _small_config()
  model, _ = serve.load_model(config)
  budget = online.make_budget(config, model)
  hardware = get_profile(config.hardware)
  phases = online_eval.scenario_phases(config, "chat,burst")
  stream = online_eval.make_stream(phases, model.config.vocab_size,
                                   online_eval.phase_seeds(11, 2),
                                   config.arrival_step_s)
  start = Split.make(2, budget.max_kv_blocks(2), model.config.num_layers)
  out = {}
  for decision in ("inline", "free"):
    rule = online.make_rule("step_curve", config, model, budget, hardware)
    out[decision] = online_eval.serve_open_loop(
        model, config, budget, stream, start, rule, hardware, 2, decision)
  inline, free = out["inline"], out["free"]
  assert free["decision_s"] == 0 and free["decision_off_path_s"] == 0
  assert inline["decision_s"] > 0
  assert free["tokens"] == inline["tokens"]
  assert inline["splits"] and free["splits"][0] == inline["splits"][0]
  # The switching oracle knows its schedule: it pays its resizes (drain
  # and rebuild), never a decision.
  second = next(at for _, at, phase in stream if phase == 1)
  other = Split.make(*inline["splits"][0], model.config.num_layers)
  oracle = online_eval.serve_open_loop(
      model, config, budget, stream, start, None, hardware, 2,
      schedule=[(second, other)])
  assert oracle["resizes"] == 1 and oracle["resize_s"] > 0
  assert oracle["decision_s"] == 0
