"""Decode steps of real-size models, lowered from shapes alone.

`lower_decode_step` traces, lowers and compiles the serving decode step of
a model whose weights would not fit this machine: every argument is a
`jax.ShapeDtypeStruct` (the host bank one in `pinned_host` memory), so
nothing of model size is allocated. The compiled step's memory analysis
(temporaries, arguments, aliasing) and the phase timings are what the
tests and the compile-time benchmark read.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.kv_cache import KVCache
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging import pager
from wisp_jax.paging import sources
from wisp_jax.serving import step as step_lib


@dataclasses.dataclass(frozen=True)
class LoweredStep:
  """A decode step lowered and compiled from shapes.

  Attributes:
    experts: the source.
    batch: B.
    trace_s: seconds to trace.
    lower_s: seconds to lower to StableHLO.
    compile_s: seconds XLA took to compile.
    hlo_lines: lines of the lowered StableHLO.
    temp_bytes: the compiled step's temporaries.
    argument_bytes: its arguments.
    slot_table_bytes: one layer's slot table (S experts), for `paged`.
    expert_bytes: one expert as stored.
  """
  experts: str
  batch: int
  trace_s: float
  lower_s: float
  compile_s: float
  hlo_lines: int
  temp_bytes: int
  argument_bytes: int
  slot_table_bytes: int
  expert_bytes: int


def _struct(shape, dtype, memory_kind: str | None = None):
  device = jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(
      device, **({"memory_kind": memory_kind} if memory_kind else {}))
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                              sharding=sharding)


def abstract_experts(config: MoEConfig, dtype, memory_kind: str | None,
                     rows: int | None = None) -> moe.ExpertWeights:
  """`[L, R, ...]` expert shapes (R = E by default) in storage dtype."""
  c = config
  rows = c.num_experts if rows is None else rows
  stored = bank_lib.storage_dtype(dtype)
  return moe.ExpertWeights(
      gate=_struct((c.num_layers, rows, c.d_model, c.expert_ffn), stored,
                   memory_kind),
      up=_struct((c.num_layers, rows, c.d_model, c.expert_ffn), stored,
                 memory_kind),
      down=_struct((c.num_layers, rows, c.expert_ffn, c.d_model), stored,
                   memory_kind))


def lower_decode_step(config: MoEConfig, experts: str, batch: int,
                      cache_len: int = 1024, slots: int | None = None,
                      policy: str = "lru", dtype=jnp.bfloat16) -> LoweredStep:
  """Traces, lowers and compiles one decode step from shapes.

  Args:
    config: the model (any size: nothing of its size is allocated).
    experts: "resident" or "paged" (or "transient").
    batch: B.
    cache_len: KV cache positions per row.
    slots: slots per layer for `paged` (default E/2).
    policy: paging policy.
    dtype: parameter dtype.
  """
  c = config
  abstract = nnx.eval_shape(lambda: MoEModel(c, rngs=nnx.Rngs(0),
                                             dtype=dtype))
  graphdef, state = nnx.split(abstract.decoder)
  state = jax.tree.map(lambda s: _struct(s.shape, s.dtype), state)
  slots = slots or max(c.num_experts // 2, c.top_k)
  spec = sources.spec_for(experts, policy)
  if experts == "resident":
    arrays = abstract_experts(c, dtype, None)
    carry = jax.eval_shape(lambda: sources.Traffic.zeros(c.num_layers))
  else:
    arrays = abstract_experts(c, dtype, bank_lib.HOST)
    if experts == "paged":
      rule = spec.rule
      state_shapes = jax.eval_shape(
          lambda: pager.init_state(rule, c.num_layers, c.num_experts, slots))
      carry = sources.PagedCarry(
          slots=abstract_experts(c, dtype, None, rows=slots),
          state=jax.tree.map(lambda s: _struct(s.shape, s.dtype),
                             state_shapes))
    else:
      carry = jax.eval_shape(lambda: sources.Traffic.zeros(c.num_layers))
  carry = jax.tree.map(lambda s: _struct(s.shape, s.dtype), carry)
  kv_shape = (c.num_layers, batch, cache_len, c.num_kv_heads, c.head_dim)
  kv = KVCache(k=_struct(kv_shape, dtype), v=_struct(kv_shape, dtype),
               start=_struct((batch,), jnp.int32),
               index=_struct((), jnp.int32))
  tokens = _struct((batch, 1), jnp.int32)
  sampling = step_lib.Sampling(
      last=_struct((batch,), jnp.int32), seed=_struct((batch,), jnp.uint32),
      counter=_struct((batch,), jnp.int32),
      temperature=_struct((batch,), jnp.float32), greedy=True)
  step = step_lib.jit_step()
  t0 = time.perf_counter()
  traced = step.trace(graphdef, state, spec, arrays, carry, kv, tokens,
                      sampling)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  memory = compiled.memory_analysis()
  expert_bytes = c.expert_params * np.dtype(bank_lib.storage_dtype(dtype)
                                            ).itemsize
  return LoweredStep(
      experts=experts, batch=batch, trace_s=t1 - t0, lower_s=t2 - t1,
      compile_s=t3 - t2, hlo_lines=len(lowered.as_text().splitlines()),
      temp_bytes=int(memory.temp_size_in_bytes),
      argument_bytes=int(memory.argument_size_in_bytes),
      slot_table_bytes=slots * expert_bytes, expert_bytes=expert_bytes)
