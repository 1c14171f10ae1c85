"""Tests of wisp_jax/sim/cost.py and wisp_jax/sim/hardware.py."""

import dataclasses

import pytest

from wisp_jax.models.config import MoEConfig, get_config
from wisp_jax.sim import cost, hardware

# Made-up model: tied embeddings, no biases, no shared expert.
TOY = MoEConfig(name="toy", vocab_size=10, d_model=4, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=2, num_experts=4,
                top_k=2, expert_ffn=8, tie_embeddings=True)
# Made-up profile with round numbers.
TOY_HW = dict(name="toy-gpu", h2d_bytes_per_s=1e9, hbm_bytes_per_s=1e10,
              bf16_flops=1e12, memory_bytes=10**6, step_overhead_s=1e-3)


def test_toy_byte_counts():
  # Per layer: q 4x4 + k, v 4x2 each + o 4x4 = 48; norms 2x4; router 4x4.
  # Plus the tied embedding 10x4 and the final norm 4.
  assert cost.dense_param_count(TOY) == 2 * (48 + 8 + 16) + 40 + 4
  assert cost.expert_bytes(TOY) == 3 * 4 * 8 * 2
  assert cost.all_experts_bytes(TOY) == 2 * 4 * 192
  assert cost.kv_bytes_per_token(TOY) == 2 * 2 * 1 * 2 * 2
  assert cost.active_param_count(TOY) == 188 + 2 * 2 * 96


# default: tied embeddings; qwen1.5: qkv bias and gated shared expert;
# olmoe: full qk-norm; qwen3: per-head qk-norm.
@pytest.mark.parametrize("name", ["default", "qwen1.5-moe-a2.7b",
                                  "olmoe-1b-7b", "qwen3-30b-a3b"])
def test_dense_params_match_the_model(name):
  import jax
  from flax import nnx
  from wisp_jax.models.transformer import MoEModel
  config = get_config(name)
  model = nnx.eval_shape(lambda: MoEModel(config))
  dense = jax.tree.leaves(nnx.state(model.decoder, nnx.Param))
  experts = jax.tree.leaves(nnx.state(model.experts))
  assert sum(x.size for x in dense) == cost.dense_param_count(config)
  assert sum(x.size for x in experts) * 2 == cost.all_experts_bytes(config)


def test_hand_computed_decode_step():
  step = cost.step_cost(TOY, TOY_HW, batch=1, context_len=10, mode="paged",
                        misses=3)
  # flops = 2 x 572 x 1; HBM = 188x2 dense + 4 needed experts x 192 + KV
  # 10 x 16; transfer = 3 x 192 bytes at 1e9 B/s.
  assert step.flops == 1144
  assert step.hbm_bytes == 376 + 768 + 160
  assert step.transfer_bytes == 576 and step.experts_moved == 3
  assert step.compute_s == pytest.approx(1.144e-9)
  assert step.hbm_s == pytest.approx(1.304e-7)
  assert step.transfer_s == pytest.approx(5.76e-7)
  assert step.total_s == pytest.approx(1.304e-7 + 5.76e-7 + 1e-3)
  assert step.decode_tokens_per_s == pytest.approx(1 / step.total_s)
  overlapped = cost.step_cost(TOY, TOY_HW, batch=1, context_len=10,
                              misses=3, overlap=True)
  assert overlapped.total_s == pytest.approx(5.76e-7 + 1e-3)


def test_prefill_processes_batch_times_context_tokens():
  step = cost.step_cost(TOY, TOY_HW, batch=2, context_len=5,
                        mode="transient", phase="prefill")
  assert step.tokens == 10
  assert step.experts_moved == 2 * 4  # L x min(E, 10 tokens x K)
  assert step.flops == 2 * 572 * 10


def test_static_offload_moves_all_experts_every_pass():
  config = get_config("mixtral-8x7b")
  step = cost.step_cost(config, "rtx3090", batch=4, context_len=512,
                        mode="static_offload")
  assert step.experts_moved == 32 * 8
  assert step.transfer_bytes == cost.all_experts_bytes(config)
  assert step.transfer_bytes == 32 * 8 * 3 * 4096 * 14336 * 2
  bandwidth = 0.8 * 16e9 * 16 * 128 / 130 / 8
  assert step.transfer_s == pytest.approx(step.transfer_bytes / bandwidth)


def test_paged_with_no_misses_equals_resident_when_it_fits():
  config = get_config("olmoe-1b-7b")
  kwargs = dict(batch=8, context_len=1024, needed_experts=16 * 40)
  resident = cost.step_cost(config, "h100-pcie", mode="resident", **kwargs)
  paged = cost.step_cost(config, "h100-pcie", mode="paged", misses=0,
                         **kwargs)
  assert dataclasses.replace(paged, mode="resident") == resident
  assert resident.transfer_s == 0


def test_resident_refuses_a_model_that_does_not_fit():
  with pytest.raises(ValueError, match="does not fit resident on rtx3090"):
    cost.step_cost(get_config("mixtral-8x7b"), "rtx3090", batch=1,
                   context_len=128, mode="resident")
  with pytest.raises(ValueError, match="needs misses"):
    cost.step_cost(TOY, TOY_HW, batch=1, context_len=1, mode="paged")
  with pytest.raises(ValueError, match="mode must be one of"):
    cost.step_cost(TOY, TOY_HW, batch=1, context_len=1, mode="lru")


def test_profiles():
  h100 = hardware.get_profile("h100-nvl")
  assert h100.memory_bytes == 94 * 2**30
  assert h100.h2d_nominal_bytes_per_s == pytest.approx(63.015e9, rel=1e-4)
  assert h100.h2d_bytes_per_s == pytest.approx(0.8 * 63.015e9, rel=1e-4)
  t4 = hardware.get_profile("t4")
  assert t4.h2d_bytes_per_s == pytest.approx(0.8 * 15.754e9, rel=1e-4)
  assert set(hardware.PROFILES) == {"rtx3090", "a40", "l40", "t4",
                                    "h100-pcie", "h100-nvl"}
  with pytest.raises(ValueError, match="known profiles: a40, h100-nvl"):
    hardware.get_profile("v100")


def test_user_defined_profile_from_dict():
  hw = hardware.get_profile(TOY_HW)
  assert hw.h2d_source == "user-defined"
  assert hw.h2d_nominal_bytes_per_s == 1e9
  with pytest.raises(ValueError, match=r"missing \['bf16_flops'\]"):
    hardware.profile_from_dict({k: v for k, v in TOY_HW.items()
                                if k != "bf16_flops"})
  with pytest.raises(ValueError, match="unknown HardwareProfile keys"):
    hardware.profile_from_dict({**TOY_HW, "pcie": 4})
  with pytest.raises(ValueError, match="hbm_bytes_per_s must be positive"):
    hardware.profile_from_dict({**TOY_HW, "hbm_bytes_per_s": 0})


def test_static_offload_at_a_budget_streams_what_is_not_kept():
  # TOY: L x E = 8 experts of 192 bytes; keep 3 resident, stream 5 per pass.
  kept = cost.step_cost(TOY, TOY_HW, batch=1, context_len=0,
                        mode="static_offload", resident_experts=3)
  assert kept.experts_moved == 8 - 3
  assert kept.transfer_bytes == 5 * 192
  assert kept.transfer_s == pytest.approx(5 * 192 / 1e9)
  layer = cost.step_cost(TOY, TOY_HW, batch=1, context_len=0,
                         mode="layer_offload")
  assert layer.experts_moved == 8 and layer.transfer_bytes == 8 * 192
  none_kept = cost.step_cost(TOY, TOY_HW, batch=1, context_len=0,
                             mode="static_offload")
  assert none_kept.total_s == layer.total_s
  with pytest.raises(ValueError, match="resident_experts=9"):
    cost.step_cost(TOY, TOY_HW, batch=1, context_len=0,
                   mode="static_offload", resident_experts=9)


def test_expert_widths():
  # int8 and int4 experts: 96 and 48 bytes; dense weights stay bf16.
  assert cost.expert_bytes(TOY, 1) == 96 and cost.expert_bytes(TOY, 0.5) == 48
  assert cost.model_bytes(TOY, 2, 0.5) == cost.dense_bytes(TOY) + 8 * 48
  int4 = cost.step_cost(TOY, TOY_HW, batch=1, context_len=0,
                        mode="layer_offload", expert_bytes_per_param=0.5)
  assert int4.transfer_bytes == 8 * 48


def test_compressed_moves_and_decoding_by_hand():
  # 3 experts of 192 bytes at ratio 1.5: 384 bytes cross; decoding them
  # at 1e8 B/s of output takes 3 x 192 / 1e8 s.
  step = cost.step_cost(TOY, TOY_HW, batch=1, context_len=10, misses=3,
                        compression_ratio=1.5, decode_bytes_per_s=1e8)
  assert step.transfer_bytes == 384 and step.experts_moved == 3
  assert step.transfer_s == pytest.approx(3.84e-7)
  assert step.decode_s == pytest.approx(5.76e-6)
  assert step.total_s == pytest.approx(1.304e-7 + 3.84e-7 + 5.76e-6 + 1e-3)
  # A compressed device tier decodes every needed expert, hits included.
  tier = cost.step_cost(TOY, TOY_HW, batch=1, context_len=10, misses=0,
                        compression_ratio=1.5, decode_bytes_per_s=1e8,
                        decoded_experts=4)
  assert tier.transfer_bytes == 0
  assert tier.decode_s == pytest.approx(4 * 192 / 1e8)
  overlapped = cost.step_cost(TOY, TOY_HW, batch=1, context_len=10,
                              misses=3, compression_ratio=1.5,
                              decode_bytes_per_s=1e8, overlap=True)
  assert overlapped.total_s == pytest.approx(
      max(1.144e-9 + 5.76e-6, 1.304e-7, 3.84e-7) + 1e-3)
  # Uncompressed steps decode nothing.
  assert cost.step_cost(TOY, TOY_HW, batch=1, context_len=10,
                        misses=3).decode_s == 0.0
  with pytest.raises(ValueError, match="decode_bytes_per_s > 0"):
    cost.step_cost(TOY, TOY_HW, batch=1, context_len=10, misses=3,
                   compression_ratio=1.5)
  with pytest.raises(ValueError, match="compression_ratio must be >= 1"):
    cost.step_cost(TOY, TOY_HW, batch=1, context_len=10, misses=3,
                   compression_ratio=0.5)
