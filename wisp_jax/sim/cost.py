"""Roofline latency of one forward step, with expert traffic over PCIe.

  compute_s  = flops / bf16_flops,  flops = 2 x active params x tokens
  hbm_s      = (active weight bytes + KV bytes read) / hbm_bytes_per_s
  transfer_s = experts moved x expert bytes / h2d_bytes_per_s
  total_s    = max(compute_s, hbm_s) + transfer_s + step_overhead_s

Transfers are NOT overlapped with compute by default: in decode the experts
a step needs are known only after its router runs, so paging them in sits on
the critical path. `overlap=True` gives the optimistic bound
max(compute_s, hbm_s, transfer_s) + step_overhead_s (perfect prefetch).

Active params per token are the dense params a step reads (everything but
an untied input embedding, which is a row lookup) plus K experts per layer.
Attention FLOPs are left out (small next to the weights at decode). Expert
weights read from HBM are the distinct experts a step computes
(`needed_experts`, summed over layers); without it, the bound
L x min(E, tokens x K) is used.

Compressed experts (`compression_ratio` r > 1, `wisp_jax.compress`): each
expert moved crosses PCIe at 1/r of its bytes, and every decoded expert
(`decoded_experts`, default the experts moved) costs its raw bytes /
`decode_bytes_per_s` on the device, added to the step (with `overlap`,
added to compute, which it competes with):

  decode_s   = decoded experts x expert bytes / decode_bytes_per_s

So a compressed host bank pays when decoding an expert takes less time than
the PCIe bytes it saves: decode_bytes_per_s > h2d_bytes_per_s x r / (r - 1)
(3.3x the link at r = 1.43).

Modes (what crosses PCIe per forward step):
  resident        nothing; refused if weights + KV do not fit the budget.
  static_offload  every expert not kept resident (`resident_experts` of the
                  L x E stay on the device): vLLM `--cpu-offload-gb`, which
                  keeps what fits and streams the offloaded rest each pass.
  layer_offload   all E experts of every layer (nothing kept).
  transient       every expert the step needs (use-then-evict).
  paged           the given misses (loads; a pinned hot set's misses too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

from wisp_jax.models.config import MoEConfig
from wisp_jax.paging.sources import SOURCES
from wisp_jax.sim.hardware import HardwareProfile, get_profile

Mode = Literal["resident", "static_offload", "layer_offload", "transient",
               "paged"]
Phase = Literal["decode", "prefill"]
# The modes are the live expert sources.
MODES = SOURCES


def dense_param_count(config: MoEConfig) -> int:
  """Parameters outside the routed experts (embeddings, attention, norms,
  routers, shared experts, LM head), as `models.transformer` builds them."""
  c = config
  q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  attention = c.d_model * (q_width + 2 * kv_width) + q_width * c.d_model
  if c.qkv_bias:
    attention += q_width + 2 * kv_width
  if c.qk_norm == "per_head":
    attention += 2 * c.head_dim
  elif c.qk_norm == "full":
    attention += q_width + kv_width
  shared = 3 * c.d_model * c.shared_ffn
  if c.shared_ffn and c.shared_expert_gate:
    shared += c.d_model
  per_layer = attention + 2 * c.d_model + c.d_model * c.num_experts + shared
  embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return c.num_layers * per_layer + embeddings + c.d_model


def _bytes(count: int, bytes_per_param: float) -> int:
  """Bytes of `count` values at a width that may be fractional (int4)."""
  return int(math.ceil(count * bytes_per_param))


def dense_bytes(config: MoEConfig, bytes_per_param: float = 2) -> int:
  """Bytes of the dense (non-expert) parameters."""
  return _bytes(dense_param_count(config), bytes_per_param)


def expert_bytes(config: MoEConfig, bytes_per_param: float = 2) -> int:
  """Bytes of one routed expert."""
  return _bytes(config.expert_params, bytes_per_param)


def all_experts_bytes(config: MoEConfig, bytes_per_param: float = 2) -> int:
  """Bytes of all L x E routed experts."""
  return config.num_layers * config.num_experts * expert_bytes(
      config, bytes_per_param)


def model_bytes(config: MoEConfig, bytes_per_param: float = 2,
                expert_bytes_per_param: float | None = None) -> int:
  """Bytes of every parameter of the model."""
  experts = (bytes_per_param if expert_bytes_per_param is None else
             expert_bytes_per_param)
  return dense_bytes(config, bytes_per_param) + all_experts_bytes(
      config, experts)


def kv_bytes_per_token(config: MoEConfig, bytes_per_value: float = 2) -> int:
  """KV-cache bytes of one token: keys and values of every layer."""
  return _bytes(2 * config.num_layers * config.num_kv_heads * config.head_dim,
                bytes_per_value)


def active_param_count(config: MoEConfig) -> int:
  """Parameters one token multiplies with (see the module docstring)."""
  untied_embed = 0 if config.tie_embeddings else (config.vocab_size
                                                  * config.d_model)
  return (dense_param_count(config) - untied_embed
          + config.num_layers * config.top_k * config.expert_params)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Latency breakdown of one forward step.

  Attributes:
    mode: expert residency mode.
    phase: "decode" or "prefill".
    batch: rows in the step.
    tokens: tokens processed (batch for decode, batch x context for prefill).
    flops: 2 x active params x tokens.
    hbm_bytes: weight bytes + KV bytes read from device memory.
    experts_moved: experts copied host -> device (summed over layers).
    transfer_bytes: bytes over PCIe (experts_moved x expert bytes, / the
      compression ratio).
    compute_s, hbm_s, transfer_s, overhead_s: the terms, in seconds.
    total_s: the step's latency.
    decode_s: decompressing experts on the device (0 without compression).
  """
  mode: str
  phase: str
  batch: int
  tokens: int
  flops: float
  hbm_bytes: int
  experts_moved: int
  transfer_bytes: int
  compute_s: float
  hbm_s: float
  transfer_s: float
  overhead_s: float
  total_s: float
  decode_s: float = 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    """Predicted decode throughput: batch / step time."""
    return self.batch / self.total_s


def step_cost(config: MoEConfig,
              profile: str | Mapping[str, Any] | HardwareProfile, *,
              batch: int, context_len: int, mode: Mode = "paged",
              phase: Phase = "decode", misses: int | None = None,
              needed_experts: int | None = None,
              resident_experts: int = 0, bytes_per_param: float = 2,
              expert_bytes_per_param: float | None = None,
              kv_bytes_per_value: float | None = None, overlap: bool = False,
              memory_budget_bytes: int | None = None,
              compression_ratio: float = 1.0,
              decode_bytes_per_s: float | None = None,
              decoded_experts: int | None = None) -> StepCost:
  """Predicted latency of one forward step.

  Args:
    config: the model.
    profile: a `HardwareProfile`, its name, or a dict of its fields.
    batch: rows in the step (B).
    context_len: tokens of KV each row reads (decode), or the prompt length
      of each row (prefill: batch x context_len tokens are processed).
    mode: "resident", "static_offload", "layer_offload", "transient" or
      "paged".
    phase: "decode" or "prefill".
    misses: experts paged in this step, summed over layers (mode "paged").
    needed_experts: distinct experts computed this step, summed over layers
      (default L x min(E, tokens x K)).
    resident_experts: experts kept on the device, summed over layers (mode
      "static_offload"; the other L x E - resident_experts stream).
    bytes_per_param: dense weight width (bf16: 2).
    expert_bytes_per_param: expert weight width (bf16 2, int8 1, int4 0.5;
      default: bytes_per_param).
    kv_bytes_per_value: KV width (default: bytes_per_param).
    overlap: overlap transfers with compute (optimistic bound).
    memory_budget_bytes: device memory for mode "resident" (default: the
      profile's memory).
    compression_ratio: raw / compressed bytes of an expert as it crosses
      PCIe (1.0: uncompressed).
    decode_bytes_per_s: the device's decode throughput in raw bytes of
      output per second (needed when anything is decoded).
    decoded_experts: experts decoded this step, summed over layers
      (default: the experts moved when compression_ratio > 1, else 0; a
      compressed device tier decodes every needed expert).

  Returns:
    the breakdown; `.decode_tokens_per_s` is batch / total_s.

  Raises:
    ValueError: on a bad argument, or a resident model that does not fit.
  """
  hw = get_profile(profile)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if phase not in ("decode", "prefill"):
    raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}.")
  if batch < 1 or context_len < 0:
    raise ValueError(f"need batch >= 1 and context_len >= 0, got batch="
                     f"{batch}, context_len={context_len}.")
  if mode == "paged" and misses is None:
    raise ValueError("mode='paged' needs misses (experts paged in this step, "
                     "summed over layers); pass misses=0 for all hits.")
  if misses is not None and misses < 0:
    raise ValueError(f"misses must be >= 0 experts, got {misses}.")
  num_layers, num_experts = config.num_layers, config.num_experts
  tokens = batch if phase == "decode" else batch * max(context_len, 1)
  if needed_experts is None:
    needed_experts = num_layers * min(num_experts, tokens * config.top_k)
  if not 0 <= needed_experts <= num_layers * num_experts:
    raise ValueError(f"needed_experts={needed_experts} must lie in [0, L x E"
                     f" = {num_layers * num_experts}].")
  kv_width = bytes_per_param if kv_bytes_per_value is None else (
      kv_bytes_per_value)
  kv_read = batch * context_len * kv_bytes_per_token(config, kv_width)
  expert_width = (bytes_per_param if expert_bytes_per_param is None else
                  expert_bytes_per_param)
  one_expert = expert_bytes(config, expert_width)

  if mode == "resident":
    budget = hw.memory_bytes if memory_budget_bytes is None else (
        memory_budget_bytes)
    needed_bytes = model_bytes(config, bytes_per_param, expert_width) + kv_read
    if needed_bytes > budget:
      raise ValueError(
          f"{config.name} does not fit resident on {hw.name}: weights "
          f"{model_bytes(config, bytes_per_param, expert_width) / 2**30:.2f} "
          f"GiB + KV "
          f"{kv_read / 2**30:.2f} GiB > budget {budget / 2**30:.2f} GiB; use "
          "mode='paged', 'transient' or 'static_offload', or a bigger "
          "memory_budget_bytes.")
  if not 0 <= resident_experts <= num_layers * num_experts:
    raise ValueError(f"resident_experts={resident_experts} must lie in [0, "
                     f"L x E = {num_layers * num_experts}].")
  moved = {"resident": 0,
           "static_offload": num_layers * num_experts - resident_experts,
           "layer_offload": num_layers * num_experts,
           "transient": needed_experts, "paged": misses}[mode]

  if compression_ratio < 1:
    raise ValueError(f"compression_ratio must be >= 1, got "
                     f"{compression_ratio}.")
  if decoded_experts is None:
    decoded_experts = moved if compression_ratio > 1 else 0
  if decoded_experts < 0:
    raise ValueError(f"decoded_experts must be >= 0, got {decoded_experts}.")
  if decoded_experts and not (decode_bytes_per_s or 0) > 0:
    raise ValueError("decoding experts needs decode_bytes_per_s > 0 (raw "
                     f"bytes of output per second), got {decode_bytes_per_s}.")
  active_dense = active_param_count(config) - (
      num_layers * config.top_k * config.expert_params)
  flops = 2.0 * active_param_count(config) * tokens
  hbm_bytes = (_bytes(active_dense, bytes_per_param)
               + needed_experts * one_expert
               + kv_read)
  compute_s = flops / hw.bf16_flops
  hbm_s = hbm_bytes / hw.hbm_bytes_per_s
  transfer_bytes = int(math.ceil(moved * one_expert / compression_ratio))
  transfer_s = transfer_bytes / hw.h2d_bytes_per_s
  decode_s = (decoded_experts * one_expert / decode_bytes_per_s
              if decoded_experts else 0.0)
  if overlap:
    total_s = max(compute_s + decode_s, hbm_s, transfer_s) + (
        hw.step_overhead_s)
  else:
    total_s = (max(compute_s, hbm_s) + transfer_s + decode_s
               + hw.step_overhead_s)
  return StepCost(mode=mode, phase=phase, batch=batch, tokens=tokens,
                  flops=flops, hbm_bytes=int(hbm_bytes),
                  experts_moved=int(moved), transfer_bytes=transfer_bytes,
                  compute_s=compute_s, hbm_s=hbm_s, transfer_s=transfer_s,
                  overhead_s=hw.step_overhead_s, total_s=total_s,
                  decode_s=decode_s)
