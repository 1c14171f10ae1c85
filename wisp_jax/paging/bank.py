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

A tiered bank (`make_tiered_bank`, bf16 only; the paged source) adds a
compressed device tier: a chosen set of Z experts per layer is also kept,
coded, in device memory (`TieredStack`: the host stack, the tier's code
`[L, Z, ...]` and the row of each expert in it, -1 if absent). A copy of
an expert in the tier decodes it from device memory (nothing crosses
PCIe); any other copy comes from the host stack as before. The tier holds
more experts in the same bytes than raw slots would (FluxMoE's compressed
GPU backend); which experts it holds is a static plan (e.g. the most
routed ones of a profile, `tier_from_counts`), while the policy decides
which experts are raw in the slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from wisp_jax.compress import codec
from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.paging.policies import most_used

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


@struct.dataclass
class TieredStack:
  """A `[L, E, ...]` stack on the host whose experts with `row >= 0` are
  also coded in device memory (see the module docstring).

  Attributes:
    host: the host stack (a raw uint16 array or a `PackedStack`).
    tier: `PackedStack` `[L, Z, ...]` in device memory.
    row: `[L, E]` int32 device array, expert e's row in the tier or -1.
  """
  host: jax.Array | PackedStack
  tier: PackedStack
  row: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.host.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.host.dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)


def is_tiered(bank: moe.ExpertWeights) -> bool:
  """Whether `bank` has a compressed device tier (`make_tiered_bank`)."""
  return isinstance(bank.gate, TieredStack)


def host_stacks(bank: moe.ExpertWeights) -> moe.ExpertWeights:
  """The bank without its device tier (the host stacks)."""
  if not is_tiered(bank):
    return bank
  return moe.ExpertWeights(bank.gate.host, bank.up.host, bank.down.host)


def is_compressed(bank: moe.ExpertWeights) -> bool:
  """Whether `bank`'s host stacks are coded (`make_compressed_bank`, or a
  tiered bank built on one)."""
  return isinstance(host_stacks(bank).gate, PackedStack)


def _check_bf16(experts: moe.ExpertWeights) -> None:
  dtypes = {jnp.dtype(w.dtype) for w in (experts.gate, experts.up,
                                         experts.down)}
  if dtypes != {jnp.dtype(jnp.bfloat16)} and dtypes != {jnp.dtype(np.uint16)}:
    raise ValueError(f"a compressed bank codes bf16 experts; these are "
                     f"{sorted(map(str, dtypes))} (load the model with "
                     "dtype=bfloat16, or use make_bank).")


def make_compressed_bank(experts: moe.ExpertWeights, memory_kind: str = HOST
                         ) -> moe.ExpertWeights:
  """A bank of exponent-coded bf16 experts in host memory.

  Raises:
    ValueError: for weights that are not bf16 (the codec codes bf16 bits).
  """
  _check_bf16(experts)
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


def tier_from_counts(counts: np.ndarray, size: int) -> np.ndarray:
  """`[L, size]` int32: each layer's `size` most routed experts (counts
  `[L, E]`, ties to the lower id), the device tier of `make_tiered_bank`."""
  counts = np.asarray(counts)
  if counts.ndim != 2 or not 0 <= size <= counts.shape[1]:
    raise ValueError(f"counts must be [L, E] and 0 <= size <= E, got "
                     f"{counts.shape} and size={size}.")
  return most_used(counts, size)


def make_tiered_bank(experts: moe.ExpertWeights, tier_experts,
                     compressed_host: bool = True, memory_kind: str = HOST
                     ) -> moe.ExpertWeights:
  """A bank with a compressed device tier (see the module docstring).

  Args:
    experts: `[L, E, ...]` bf16 expert weights.
    tier_experts: `[L, Z]` ids of the experts the tier keeps per layer
      (distinct within a row; -1: an unused row).
    compressed_host: code the host stacks too (`make_compressed_bank`);
      else raw (`make_bank`).
    memory_kind: where the host stacks live.

  Raises:
    ValueError: weights that are not bf16, or bad tier ids.
  """
  _check_bf16(experts)
  host = (make_compressed_bank(experts, memory_kind) if compressed_host else
          make_bank(experts, memory_kind))
  num_layers, num_experts = experts.gate.shape[:2]
  tier = np.asarray(tier_experts, np.int64)
  if tier.ndim != 2 or tier.shape[0] != num_layers:
    raise ValueError(f"tier_experts must be [L={num_layers}, Z] expert ids, "
                     f"got shape {tier.shape}.")
  if tier.size and (tier.min() < -1 or tier.max() >= num_experts):
    raise ValueError(f"tier_experts must lie in [-1, {num_experts}), got "
                     f"[{tier.min()}, {tier.max()}].")
  row = np.full((num_layers, num_experts), -1, np.int32)
  for layer, ids in enumerate(tier):
    kept = ids[ids >= 0]
    if np.unique(kept).size != kept.size:
      raise ValueError(f"tier_experts of layer {layer} repeat an expert: "
                       f"{ids.tolist()}.")
    row[layer, kept] = np.flatnonzero(ids >= 0)
  device = memory_sharding("device")
  take = np.maximum(tier, 0)  # unused rows code expert 0 (never read)

  def stack(w, host_stack):
    bits = np.asarray(to_storage(w))
    chosen = np.take_along_axis(bits, take[:, :, None, None], axis=1)
    code = codec.encode(chosen, batch_dims=2)
    return TieredStack(
        host=host_stack,
        tier=PackedStack(jax.tree.map(lambda a: jax.device_put(a, device),
                                      code)),
        row=jax.device_put(row, device))

  return moe.ExpertWeights(*(stack(w, h) for w, h in (
      (experts.gate, host.gate), (experts.up, host.up),
      (experts.down, host.down))))


def tier_bytes(bank: moe.ExpertWeights) -> int:
  """Device bytes of a tiered bank's compressed tier (0 without one)."""
  if not is_tiered(bank):
    return 0
  return sum(codec.compressed_bytes(w.tier.code) for w in (
      bank.gate, bank.up, bank.down))


def bytes_per_expert(bank: moe.ExpertWeights) -> int:
  """Bytes of one expert (all three projections) as stored on the host, so
  as a copy from the host moves them (compressed: the code's arrays,
  tables and padding included)."""
  bank = host_stacks(bank)
  if is_compressed(bank):
    return sum(codec.compressed_bytes(w.code) // int(np.prod(w.shape[:2]))
               for w in (bank.gate, bank.up, bank.down))
  return sum(int(np.prod(w.shape[2:])) * w.dtype.itemsize
             for w in (bank.gate, bank.up, bank.down))
