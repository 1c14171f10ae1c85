"""The serving engine's device side: the model, the pools and the one step.

The `Executor` owns everything on the device (the decoder's parameters,
the expert source's arrays and carry, the KV block pool) and runs the
jitted step (`serving.step`, the step `generate` runs too) on the rows the
`serving.scheduler.Scheduler` hands it. The pool and the carry are donated
to every step and replaced by its outputs.

A step that raises after its call donated the pool and the carry leaves
them deleted; `recover` rebuilds them: a zeroed pool of the same size (the
keys and values of every request are lost: the engine recomputes them) and
a fresh carry built from the spec as at construction (for `paged`: empty
slots, or the `pinned` hot set, and a fresh pager state at the current
capacities, so residency restarts cold; outputs are unchanged, paging being
exact). The cumulative `counters` carry on from their last read value.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx

from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving import batch_step
from wisp_jax.serving import blocks
from wisp_jax.serving import kv_pool
from wisp_jax.serving.scheduler import Row

# Zeroes blocks of a pool in place (the pool is donated).
_zero_blocks = jax.jit(kv_pool.zero_blocks, donate_argnums=0)


def _deleted(tree) -> bool:
  """Whether any array of `tree` was deleted (donated to a call)."""
  return any(isinstance(leaf, jax.Array) and leaf.is_deleted()
             for leaf in jax.tree.leaves(tree))


class Executor:
  """Device state of one engine and the step that updates it."""

  def __init__(self, model: MoEModel, kv_blocks: int, block_size: int, *,
               experts: str, slots_per_layer, policy: str,
               policy_options: dict | None, hot_set, num_slots: int | None,
               compressed_bank: bool = False):
    config = model.config
    self.model, self.config, self.block_size = model, config, block_size
    self.kv_blocks = int(kv_blocks)
    # What rebuilds the carry after a fault (see `recover`).
    self._source_options = (policy, policy_options, hot_set)
    self._capacity = (paging_api.validate_slots(config, slots_per_layer)
                      if experts == "paged" else None)
    if compressed_bank and experts == "resident":
      raise ValueError("compressed_bank needs an offload source (paged, "
                       "transient or static_offload); resident keeps every "
                       "expert raw on the device.")
    weights = model.experts.weights()
    if experts == "resident":
      bank = weights
    elif compressed_bank:  # copies cross coded, decoded on the device
      bank = bank_lib.make_compressed_bank(weights)
    else:
      bank = bank_lib.make_bank(weights)
    self.spec, self._arrays, self._carry = paging_api.make_source(
        config, bank, experts, slots_per_layer, policy, policy_options,
        hot_set, num_slots if experts == "paged" else None)
    self.num_slots = (self.spec.num_slots(self._carry) if experts == "paged"
                      else None)
    self.bytes_per_expert = bank_lib.bytes_per_expert(bank)
    self._graphdef, self._state = nnx.split(model.decoder)
    self._pool = kv_pool.KVPool.create(config, kv_blocks, block_size,
                                       model.dtype)
    # Every step input is committed to one device: jit compiles separately
    # for committed and uncommitted arguments, and step outputs are
    # committed, so mixing them would compile each bucket twice. (The host
    # bank is already committed to its pinned_host memory.)
    self._device = jax.devices()[0]
    self._state, self._pool, self._carry = jax.device_put(
        (self._state, self._pool, self._carry), self._device)
    if experts == "resident":
      self._arrays = jax.device_put(self._arrays, self._device)
    self.max_blocks = blocks.max_blocks_per_request(config, block_size)
    # Cumulative (hits, misses, loads) `[3, L]` after the last step.
    self.counters = np.zeros((3, config.num_layers), np.int64)
    # The counters of carries rebuilt by `recover` (theirs restart at 0).
    self._counters_base = np.zeros_like(self.counters)

  def run(self, rows: Sequence[Row], batch: int, t: int,
          kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One step over `rows` padded to `[batch, t]`.

    Args:
      rows: the step's rows.
      batch: B, rows padded to it.
      t: T, tokens of each row padded to it.
      kind: "prefill" or "decode" (which jitted step).

    Returns:
      `[len(rows)]` sampled tokens and `[len(rows)]` bool, whether each
      row's logits were finite (a False row's token is garbage).
    """
    step_fn = (batch_step.prefill_step if kind == "prefill" else
               batch_step.decode_step)
    inputs = jax.device_put(
        batch_step.make_input(rows, batch, t, self.max_blocks), self._device)
    out = step_fn(self._graphdef, self._state, self.spec, self._arrays,
                  self._carry, inputs.view(self._pool), inputs.tokens,
                  inputs.sampling)
    # Read before keeping the outputs: if the step failed on the device,
    # this raises and the (donated) inputs stay, for `recover` to see.
    token, finite, counters = jax.device_get(
        (out.token, out.finite, out.counters))
    self._pool, self._carry = out.kv.pool, out.carry
    self.counters = self._counters_base + np.asarray(counters, np.int64)
    n = len(rows)
    return np.asarray(token)[:n], np.asarray(finite, bool)[:n]

  def recover(self) -> tuple[bool, bool]:
    """After a step raised: rebuilds the pool and the carry if the step
    donated them (see the module docstring).

    Returns:
      (pool rebuilt, carry rebuilt). A rebuilt pool holds no request's keys
      and values: the caller recomputes every running request.
    """
    pool_lost, carry_lost = _deleted(self._pool), _deleted(self._carry)
    if pool_lost:
      self.replace_pool(self.kv_blocks)
    if carry_lost:
      self._counters_base = self.counters.copy()
      self._carry = None
      self._carry = jax.device_put(self._fresh_carry(), self._device)
    return pool_lost, carry_lost

  def _fresh_carry(self):
    """The carry as at construction, at the current capacities."""
    if self.spec.name != "paged":
      return self.spec.init_carry(self.config.num_layers)
    policy, policy_options, hot_set = self._source_options
    _, _, carry = paging_api.make_source(
        self.config, self._arrays, "paged", self._capacity, policy,
        policy_options, hot_set, self.num_slots)
    return carry

  def scrub(self, block_ids: Sequence[int]) -> None:
    """Zeroes the keys and values of `block_ids` in every layer (blocks a
    failed request left non-finite), before any other request gets them."""
    block_ids = list(block_ids)
    # Fixed-size id lists (padded with NB, dropped): one compile per pool.
    for start in range(0, len(block_ids), self.max_blocks):
      chunk = block_ids[start:start + self.max_blocks]
      ids = np.full((self.max_blocks,), self.kv_blocks, np.int32)
      ids[:len(chunk)] = chunk
      self._pool = _zero_blocks(self._pool, jax.device_put(ids, self._device))

  @property
  def pool(self) -> kv_pool.KVPool:
    """The KV pool after the last step; read it before the next step,
    which donates it."""
    return self._pool

  @property
  def pager_state(self):
    """The paged source's `PagerState` (None for other sources); read it
    before the next step, which donates it."""
    return (self.spec.pager_state(self._carry) if self.spec.name == "paged"
            else None)

  def resize_slots(self, slots_per_layer) -> tuple[int, int]:
    """New slot capacities; returns (rows moved, residents evicted)."""
    self._carry, moves, evictions = self.spec.resize(
        self._carry, np.asarray(slots_per_layer))
    self._capacity = np.asarray(slots_per_layer)
    return int(moves.sum()), int(evictions.sum())

  def replace_pool(self, kv_blocks: int) -> None:
    """A new zeroed KV pool of `kv_blocks` blocks (the old one freed
    first)."""
    self._pool = None
    self._pool = jax.device_put(kv_pool.KVPool.create(
        self.config, kv_blocks, self.block_size, self.model.dtype),
                                self._device)
    self.kv_blocks = int(kv_blocks)
