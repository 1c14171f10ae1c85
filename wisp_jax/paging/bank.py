"""The host-resident expert bank: every expert of every layer in host memory.

The bank is an `ExpertWeights` whose leaves are `[L, E, ...]` arrays in the
`pinned_host` memory kind. bf16 weights are stored as their raw `uint16`
bits (XLA:CPU would otherwise hoist a whole-bank convert out of the decode
loop); `moe.as_dtype` bitcasts them back at the gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig

HOST = "pinned_host"


def memory_sharding(memory_kind: str, device=None):
  """Single-device sharding in `memory_kind` ('device' or 'pinned_host')."""
  device = device or jax.devices()[0]
  return jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)


def storage_dtype(dtype) -> np.dtype:
  """How a weight dtype is stored in banks and slots (bf16 -> uint16 bits)."""
  return np.dtype(np.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


to_storage = moe.as_bits


def make_bank(experts: moe.ExpertWeights, memory_kind: str = HOST
              ) -> moe.ExpertWeights:
  """Moves `[L, E, ...]` expert weights into host memory as stored bits."""
  sharding = memory_sharding(memory_kind)
  return jax.tree.map(lambda w: jax.device_put(to_storage(w), sharding),
                      experts)


def check_bank(bank: moe.ExpertWeights, config: MoEConfig) -> None:
  """Raises if the bank's shapes disagree with the model config."""
  c = config
  want = {"gate": (c.num_layers, c.num_experts, c.d_model, c.expert_ffn),
          "up": (c.num_layers, c.num_experts, c.d_model, c.expert_ffn),
          "down": (c.num_layers, c.num_experts, c.expert_ffn, c.d_model)}
  for name, shape in want.items():
    got = tuple(getattr(bank, name).shape)
    if got != shape:
      raise ValueError(
          f"expert bank '{name}' has shape {got} but config {c.name!r} needs "
          f"{shape} ([L, E, ...]); the bank was built for another model.")
  dtypes = {getattr(bank, name).dtype for name in want}
  if len(dtypes) != 1:
    raise ValueError(f"expert bank mixes dtypes {sorted(map(str, dtypes))}.")


def bytes_per_expert(bank: moe.ExpertWeights) -> int:
  """Bytes of one expert (all three projections) as stored."""
  return sum(int(np.prod(w.shape[2:])) * w.dtype.itemsize
             for w in (bank.gate, bank.up, bank.down))
