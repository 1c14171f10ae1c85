"""Tests for wisp_jax/compress/measure.py on small sizes."""

import numpy as np
import pytest
import torch

from wisp_jax.compress import codec, measure


def test_gaussian_stats_are_below_the_entropy_bound():
  stacks = measure.gaussian_experts(2, 3, d_model=64, expert_ffn=96)
  assert stacks["gate"].shape == (2, 3, 64, 96)
  assert stacks["down"].shape == (2, 3, 96, 64)
  # std fan_in ** -0.5: gate's fan-in is 64, down's is 96.
  for name, fan_in in (("gate", 64), ("down", 96)):
    w = stacks[name].astype(np.uint32) << 16
    assert np.std(w.view(np.float32)) == pytest.approx(fan_in ** -0.5,
                                                       rel=0.05)
  r = measure.stack_stats(stacks["gate"])
  # A Gaussian's bf16 exponents carry about 2.54 bits whatever the scale.
  assert r["entropy_bits"] == pytest.approx(2.54, abs=0.05)
  # A symbol code cannot beat the empirical entropy: the bound is strict.
  assert 1.35 < r["ratio"] < r["entropy_ratio"]
  assert r["code_bits"] == 3 and not r["is_raw"]
  c = codec.encode(stacks["gate"], batch_dims=2)
  assert r["bits_per_value"] == 8 * codec.compressed_bytes(c) / (2 * 3 * 64 * 96)


def test_ratio_table_pools_bytes():
  stacks = {"gate": measure.gaussian_experts(1, 2, 32, 64)["gate"],
            "noise": np.random.default_rng(0).integers(
                0, 2**16, (1, 2, 32, 64), np.uint16)}
  rows = measure.ratio_table({"mixed": stacks})["mixed"]
  assert rows["noise"]["is_raw"]
  gate = codec.compressed_bytes(codec.encode(stacks["gate"], 2))
  noise = codec.compressed_bytes(codec.encode(stacks["noise"], 2))
  assert noise == 2 * (2 * 32 * 64 + 1)
  assert rows["all"]["ratio"] == pytest.approx(2 * 2 * 2 * 32 * 64 /
                                               (gate + noise))
  text = measure.markdown({"mixed": rows}, {})
  assert "| mixed | noise | (1, 2, 32, 64) | raw |" in text


def test_hf_mixtral_experts_are_the_model_weights():
  stacks = measure.hf_mixtral_experts(num_layers=2, num_experts=3,
                                      hidden_size=32, intermediate_size=24)
  assert stacks["gate"].shape == stacks["up"].shape == (2, 3, 32, 24)
  assert stacks["down"].shape == (2, 3, 24, 32)
  # Rebuild the same model (same seed) and read expert 2 of layer 1 apart.
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
      vocab_size=64, hidden_size=32, intermediate_size=24,
      num_hidden_layers=2, num_local_experts=3, num_attention_heads=4,
      num_key_value_heads=2, num_experts_per_tok=2)).to(torch.bfloat16)
  experts = model.model.layers[1].mlp.experts
  as_bits = lambda t: t.detach().view(torch.int16).numpy().view(np.uint16)
  gate_up = as_bits(experts.gate_up_proj[2])  # [2F, D]
  np.testing.assert_array_equal(stacks["gate"][1, 2], gate_up[:24].T)
  np.testing.assert_array_equal(stacks["up"][1, 2], gate_up[24:].T)
  np.testing.assert_array_equal(stacks["down"][1, 2],
                                as_bits(experts.down_proj[2]).T)


def test_default_model_experts_compress():
  stacks = measure.default_model_experts()
  assert stacks["gate"].shape == (4, 8, 128, 192)
  assert stacks["down"].shape == (4, 8, 192, 128)
  r = measure.stack_stats(stacks["down"])
  assert 1.35 < r["ratio"] < r["entropy_ratio"]


def test_decode_throughput_reports_spread():
  bits = measure.gaussian_experts(1, 2, 32, 48)["up"]
  s = measure.decode_throughput(bits, batch_dims=2, repeats=3)
  assert s["decoded_bytes"] == bits.size * 2 and s["repeats"] == 3
  assert 0 < s["gbps_min"] <= s["gbps_median"] <= s["gbps_max"]
  text = measure.markdown({}, {"x": s})
  assert text.count("\n| x | ") == 1
