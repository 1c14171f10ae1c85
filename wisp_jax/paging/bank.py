"""The host-resident expert bank: every expert of every layer in host memory.

The bank is an `ExpertWeights` whose leaves are `[L, E, ...]` arrays in the
`pinned_host` memory kind. bf16 weights are stored as their raw `uint16`
bits (XLA:CPU would otherwise hoist a whole-bank convert out of the decode
loop); `moe.as_dtype` bitcasts them back at the gather.

A compressed bank (`make_compressed_bank`, bf16 only) holds each
projection as a `PackedStack`: the `wisp_jax.compress` code of the `[L, E]`
stack. A copy then moves one expert's code (fewer bytes over PCIe) and
decodes it on the device into the raw slot row, bit for bit the stored
bits, so outputs stay those of resident. A `PackedStack` reports the
`shape`, `dtype` and `ndim` of the raw stack it codes; `zeros_rows` sizes
device buffers for either kind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from wisp_jax.compress import codec
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


def to_device(x):
  """`x` moved to device memory (inside jit: a host-to-device copy)."""
  return jax.device_put(x, jax.memory.Space.Device)


@struct.dataclass
class PackedStack:
  """A compressed `[L, E, ...]` uint16 stack in a bank (see the module
  docstring); `shape`/`dtype`/`ndim` are those of the raw stack."""
  code: codec.Compressed

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.code.batch_shape) + tuple(self.code.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint16)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def expert(self, layer, expert) -> jax.Array:
    """One expert's decoded bits (traced indices; the code's slices are
    moved to the device first, so only compressed bytes cross)."""
    piece = jax.tree.map(
        lambda a: to_device(jax.lax.dynamic_index_in_dim(
            jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False),
            expert, 0, keepdims=False)), self.code)
    return codec.decode(piece)


def is_compressed(bank: moe.ExpertWeights) -> bool:
  """Whether `bank` was made by `make_compressed_bank`."""
  return isinstance(bank.gate, PackedStack)


def make_compressed_bank(experts: moe.ExpertWeights, memory_kind: str = HOST
                         ) -> moe.ExpertWeights:
  """A bank of exponent-coded bf16 experts in host memory.

  Raises:
    ValueError: for weights that are not bf16 (the codec codes bf16 bits).
  """
  dtypes = {jnp.dtype(w.dtype) for w in (experts.gate, experts.up,
                                         experts.down)}
  if dtypes != {jnp.dtype(jnp.bfloat16)} and dtypes != {jnp.dtype(np.uint16)}:
    raise ValueError(f"a compressed bank codes bf16 experts; these are "
                     f"{sorted(map(str, dtypes))} (load the model with "
                     "dtype=bfloat16, or use make_bank).")
  sharding = memory_sharding(memory_kind)

  def pack(w):
    code = codec.encode(np.asarray(to_storage(w)), batch_dims=2)
    return PackedStack(jax.tree.map(lambda a: jax.device_put(a, sharding),
                                    code))

  return moe.ExpertWeights(gate=pack(experts.gate), up=pack(experts.up),
                           down=pack(experts.down))


def zeros_rows(bank: moe.ExpertWeights, lead: tuple[int, ...], zeros=None
               ) -> moe.ExpertWeights:
  """A buffer of `lead + one expert's shape` per projection, in the bank's
  stored dtype (`zeros`: the allocator, default `jnp.zeros`)."""
  zeros = jnp.zeros if zeros is None else zeros
  return moe.ExpertWeights(*(zeros(tuple(lead) + tuple(w.shape[2:]),
                                   jnp.dtype(w.dtype))
                             for w in (bank.gate, bank.up, bank.down)))


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
  """Bytes of one expert (all three projections) as stored, so as a copy
  moves them (compressed: the code's arrays, tables and padding included)."""
  if is_compressed(bank):
    return sum(codec.compressed_bytes(w.code) // int(np.prod(w.shape[:2]))
               for w in (bank.gate, bank.up, bank.down))
  return sum(int(np.prod(w.shape[2:])) * w.dtype.itemsize
             for w in (bank.gate, bank.up, bank.down))
