"""The serving engine's device side: the model, the pools and the one step.

The `Executor` owns everything on the device (the decoder's parameters,
the expert source's arrays and carry, the KV block pool) and runs the
jitted step (`serving.step`, the step `generate` runs too) on the rows the
`serving.scheduler.Scheduler` hands it. The pool and the carry are donated
to every step and replaced by its outputs.
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


class Executor:
  """Device state of one engine and the step that updates it."""

  def __init__(self, model: MoEModel, kv_blocks: int, block_size: int, *,
               experts: str, slots_per_layer, policy: str,
               policy_options: dict | None, hot_set, num_slots: int | None):
    config = model.config
    self.model, self.config, self.block_size = model, config, block_size
    bank = (model.experts.weights() if experts == "resident" else
            bank_lib.make_bank(model.experts.weights()))
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

  def run(self, rows: Sequence[Row], batch: int, t: int,
          kind: str) -> np.ndarray:
    """One step over `rows` padded to `[batch, t]`; returns `[len(rows)]`
    sampled tokens. `kind` is "prefill" or "decode" (which jitted step)."""
    step_fn = (batch_step.prefill_step if kind == "prefill" else
               batch_step.decode_step)
    inputs = jax.device_put(
        batch_step.make_input(rows, batch, t, self.max_blocks), self._device)
    out = step_fn(self._graphdef, self._state, self.spec, self._arrays,
                  self._carry, inputs.view(self._pool), inputs.tokens,
                  inputs.sampling)
    self._pool, self._carry = out.kv.pool, out.carry
    token, counters = jax.device_get((out.token, out.counters))
    self.counters = np.asarray(counters, np.int64)
    return np.asarray(token)[:len(rows)]

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
    return int(moves.sum()), int(evictions.sum())

  def replace_pool(self, kv_blocks: int) -> None:
    """A new zeroed KV pool of `kv_blocks` blocks (the old one freed
    first)."""
    self._pool = None
    self._pool = jax.device_put(kv_pool.KVPool.create(
        self.config, kv_blocks, self.block_size, self.model.dtype),
                                self._device)
