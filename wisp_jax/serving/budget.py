"""Device-memory budget of a serving engine: dense weights, expert slots, KV.

The device holds four things: the dense (non-expert) weights, the expert
slots of every layer (`slots_per_layer[l]` experts of `expert_bytes` each),
the KV pool (`kv_blocks` blocks of `block_bytes` each) and a workspace
reserve (activations, gathered keys, scratch). `DeviceBudget.check(split)`
refuses a `Split` of the free bytes between slots and KV blocks that does not
fit, or that could not serve: fewer than top_k slots in a layer (one token
would not fit), more than E, or fewer KV blocks than one max-length request.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.alloc.split import BudgetError, Split
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.transformer import Decoder, MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging.pager import check_capacity
from wisp_jax.serving import blocks
from wisp_jax.serving import kv_pool


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Byte sizes of one model's pools.

  Attributes:
    dense_bytes: the non-expert weights (embeddings, attention, routers,
      norms, shared experts, LM head).
    expert_bytes: one routed expert as stored in a slot.
    block_bytes: one KV block (keys and values of every layer).
    block_size: token positions per KV block.
    num_layers: L.
    num_experts: E.
    top_k: K.
    max_seq_len: longest request (prompt + generation).
    bytes_per_param: bytes of one expert parameter as stored.
    kv_bytes_per_value: bytes of one cached key or value element.
  """
  dense_bytes: int
  expert_bytes: int
  block_bytes: int
  block_size: int
  num_layers: int
  num_experts: int
  top_k: int
  max_seq_len: int
  bytes_per_param: int
  kv_bytes_per_value: int

  @classmethod
  def of_config(cls, config: MoEConfig, block_size: int,
                dtype=jnp.bfloat16) -> "Footprint":
    """Sizes from the config alone (no weights are allocated)."""
    decoder = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0),
                                             dtype=dtype))
    dense = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(nnx.state(decoder)))
    expert = config.expert_params * bank_lib.storage_dtype(dtype).itemsize
    return cls._make(config, block_size, dense, expert, dtype)

  @classmethod
  def of_model(cls, model: MoEModel, block_size: int) -> "Footprint":
    """Sizes of a built model's weights, in its dtype."""
    dense = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.decoder)))
    expert = (model.config.expert_params *
              bank_lib.storage_dtype(model.dtype).itemsize)
    return cls._make(model.config, block_size, dense, expert, model.dtype)

  @classmethod
  def _make(cls, config, block_size, dense, expert, dtype):
    if block_size < 1:
      raise BudgetError(f"block_size must be >= 1, got {block_size}.")
    c = config
    return cls(dense_bytes=int(dense), expert_bytes=int(expert),
               block_bytes=kv_pool.block_bytes(c, block_size, dtype),
               block_size=int(block_size), num_layers=c.num_layers,
               num_experts=c.num_experts, top_k=c.top_k,
               max_seq_len=c.max_seq_len,
               bytes_per_param=int(expert) // c.expert_params,
               kv_bytes_per_value=jnp.dtype(dtype).itemsize)

  @property
  def blocks_per_max_request(self) -> int:
    return blocks.blocks_for(self.max_seq_len, self.block_size)


@dataclasses.dataclass(frozen=True)
class DeviceBudget:
  """Bytes of device memory a serving engine may use.

  Attributes:
    total_bytes: everything the engine may hold on the device.
    workspace_bytes: reserve for activations and scratch, never split.
    footprint: the model's sizes; `for_model` fills it in (the engine does
      this with its own model and block size).
  """
  total_bytes: int
  workspace_bytes: int = 0
  footprint: Footprint | None = None

  def __post_init__(self):
    if self.total_bytes <= 0 or self.workspace_bytes < 0:
      raise BudgetError(f"a budget needs total_bytes > 0 and workspace_bytes "
                        f">= 0, got {self.total_bytes} and "
                        f"{self.workspace_bytes}.")

  def for_model(self, model: MoEModel | MoEConfig, block_size: int,
                dtype=None) -> "DeviceBudget":
    """This budget bound to a model (or a config and weight dtype)."""
    if isinstance(model, MoEModel):
      footprint = Footprint.of_model(model, block_size)
    else:
      footprint = Footprint.of_config(model, block_size,
                                      dtype if dtype is not None else
                                      jnp.bfloat16)
    return dataclasses.replace(self, footprint=footprint)

  def _footprint(self) -> Footprint:
    if self.footprint is None:
      raise BudgetError("this DeviceBudget is not bound to a model; call "
                        "budget.for_model(model, block_size) first.")
    return self.footprint

  @property
  def free_bytes(self) -> int:
    """Bytes left for expert slots and KV blocks."""
    f = self._footprint()
    return self.total_bytes - self.workspace_bytes - f.dense_bytes

  def usage(self, split: Split) -> dict[str, int]:
    """Bytes of each part of the device under `split`."""
    f = self._footprint()
    experts = sum(split.slots_per_layer) * f.expert_bytes
    kv = split.kv_blocks * f.block_bytes
    return {"dense_bytes": f.dense_bytes, "expert_slot_bytes": experts,
            "kv_bytes": kv, "workspace_bytes": self.workspace_bytes,
            "used_bytes": f.dense_bytes + experts + kv + self.workspace_bytes,
            "total_bytes": self.total_bytes}

  def max_kv_blocks(self, slots_per_layer: int | Sequence[int]) -> int:
    """The most KV blocks that fit next to these expert slots."""
    f = self._footprint()
    split = Split.make(slots_per_layer, 0, f.num_layers)
    left = self.free_bytes - sum(split.slots_per_layer) * f.expert_bytes
    return max(left // f.block_bytes, 0)

  def check(self, split: Split) -> dict[str, int]:
    """Refuses a split that does not fit or cannot serve.

    Returns:
      `usage(split)`.

    Raises:
      BudgetError: with the numbers, when a layer has fewer than top_k or
        more than E slots, the pool holds fewer blocks than one max-length
        request, or the parts exceed `total_bytes`.
    """
    f = self._footprint()
    if len(split.slots_per_layer) != f.num_layers:
      raise BudgetError(f"split has slots for {len(split.slots_per_layer)} "
                        f"layers; the model has {f.num_layers}.")
    check_capacity(split.slots_per_layer, f.num_layers, f.top_k,
                   f.num_experts,
                   low_why=f"top_k={f.top_k}: one token's experts would not "
                   "fit", high_why=f"its {f.num_experts} experts",
                   low_label=f"top_k={f.top_k}", high_label=f"E={f.num_experts}",
                   error=BudgetError)
    need = f.blocks_per_max_request
    if split.kv_blocks < need:
      raise BudgetError(
          f"kv_blocks={split.kv_blocks} cannot hold one max-length request: "
          f"max_seq_len={f.max_seq_len} at block_size={f.block_size} needs "
          f"{need} blocks ({need * f.block_bytes} bytes).")
    use = self.usage(split)
    if use["used_bytes"] > self.total_bytes:
      raise BudgetError(
          f"split exceeds the device budget by "
          f"{use['used_bytes'] - self.total_bytes} bytes: dense "
          f"{use['dense_bytes']} + expert slots {sum(split.slots_per_layer)} x "
          f"{f.expert_bytes} = {use['expert_slot_bytes']} + KV "
          f"{split.kv_blocks} x {f.block_bytes} = {use['kv_bytes']} + "
          f"workspace {self.workspace_bytes} = {use['used_bytes']} > "
          f"total {self.total_bytes}. With these slots at most "
          f"{self.max_kv_blocks(split.slots_per_layer)} KV blocks fit.")
    return use
