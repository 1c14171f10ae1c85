"""The engine's jitted forward step over a batch of rows in the KV pool.

One step function serves prefill (one request, `T` = a length bucket) and
decode (`B` = a batch bucket, `T` = 1). Everything that changes from step to
step (tokens, block tables, lengths, sampling seeds) is a traced array in a
`StepInput`; the shapes are fixed by the buckets, so the decode step
compiles once per batch bucket and the prefill step once per length bucket.
The pool and the expert source's carry are donated, so they update in place.

Sampling is per row: greedy where the row's temperature is 0, otherwise a
categorical draw with key `fold_in(key(seed), counter)`. The engine sets
`counter` to what `generate` would use for that token of a lone request
(0 for the first token, then prompt length + index - 1), so a request's
samples do not depend on its batch or on preemptions.

Shape legend as in `wisp_jax.models.moe` and `wisp_jax.serving.kv_pool`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from wisp_jax.serving.kv_pool import KVPool, PagedKV

# Traces of each step kind in this process ("prefill", "decode"); the jitted
# functions below are shared by every engine, so a trace happens once per
# (model structure, source, bucket) for the whole process.
TRACE_COUNTS: collections.Counter = collections.Counter()


@struct.dataclass
class StepInput:
  """The traced inputs of one step.

  Attributes:
    tokens: `[B, T]` int32 new tokens (padded with each row's last).
    block_table: `[B, MB]` int32 pool blocks of each row.
    length: `[B]` int32 positions of each row already in the pool.
    num_new: `[B]` int32 real tokens among the `T` of each row.
    write: `[B]` bool, False for batch-padding rows.
    seed: `[B]` uint32 sampling seed of each row.
    counter: `[B]` int32 folded into the row's key for this token.
    temperature: `[B]` float32, 0 for greedy.
  """
  tokens: jax.Array
  block_table: jax.Array
  length: jax.Array
  num_new: jax.Array
  write: jax.Array
  seed: jax.Array
  counter: jax.Array
  temperature: jax.Array


@dataclasses.dataclass(frozen=True)
class Row:
  """Host description of one row of a step (see `StepInput`)."""
  tokens: Sequence[int]
  blocks: Sequence[int]
  length: int
  seed: int
  counter: int
  temperature: float


def make_input(rows: Sequence[Row], batch: int, t: int,
               max_blocks: int) -> StepInput:
  """Packs `rows` into a `[batch, t]` step; padding rows copy row 0.

  A padding row reads exactly what row 0 reads and never writes, so it
  computes row 0's tokens again: no NaN, and no experts row 0 does not need.
  Likewise each row's padding tokens repeat its last real token (at its
  position, see `PagedKV.positions`). So the pager sees the demand of the
  real tokens alone.
  """
  if not 0 < len(rows) <= batch:
    raise ValueError(f"a step of batch {batch} got {len(rows)} rows.")
  padded = list(rows) + [rows[0]] * (batch - len(rows))
  tokens = np.zeros((batch, t), np.int32)
  table = np.zeros((batch, max_blocks), np.int32)
  for i, row in enumerate(padded):
    if len(row.tokens) > t:
      raise ValueError(f"row {i} has {len(row.tokens)} tokens; the step "
                       f"takes {t}.")
    tokens[i, :len(row.tokens)] = row.tokens
    tokens[i, len(row.tokens):] = row.tokens[-1]
    table[i, :len(row.blocks)] = row.blocks
  write = np.arange(batch) < len(rows)
  return StepInput(
      tokens=tokens, block_table=table,
      length=np.array([r.length for r in padded], np.int32),
      num_new=np.array([len(r.tokens) for r in padded], np.int32),
      write=write, seed=np.array([r.seed for r in padded], np.uint32),
      counter=np.array([r.counter for r in padded], np.int32),
      temperature=np.array([r.temperature for r in padded], np.float32))


def sample_rows(logits: jax.Array, seed: jax.Array, counter: jax.Array,
                temperature: jax.Array) -> jax.Array:
  """Next token of each row: `[B, V]` float32 logits -> `[B]` int32."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(row_seed, row_counter, row_logits, row_temperature):
    key = jax.random.fold_in(jax.random.key(row_seed), row_counter)
    return jax.random.categorical(key, row_logits / row_temperature)

  sampled = jax.vmap(draw)(seed, counter, logits,
                           jnp.maximum(temperature, 1e-6)).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def step_impl(graphdef, state, spec, arrays, carry, pool: KVPool,
              inputs: StepInput):
  """One forward pass over `inputs.tokens` and a sample per row.

  Returns:
    next tokens `[B]` int32 (sampled at each row's last real token), the
    pool, the source's carry, and its cumulative counters `[3, L]` (hits,
    misses, loads).
  """
  decoder = nnx.merge(graphdef, state)
  kv = PagedKV(pool=pool, block_table=inputs.block_table,
               length=inputs.length, num_new=inputs.num_new,
               write=inputs.write)
  positions = kv.positions(inputs.tokens.shape[1])
  logits, kv, carry, _ = decoder.forward(inputs.tokens, positions, kv,
                                         spec.build(arrays), carry)
  # [B, 1, V] logits at each row's last real token.
  last = jnp.maximum(inputs.num_new - 1, 0)[:, None, None]
  logits = jnp.take_along_axis(logits, last, axis=1)[:, 0].astype(jnp.float32)
  token = sample_rows(logits, inputs.seed, inputs.counter, inputs.temperature)
  counters = jnp.stack(spec.counters(carry))
  return token, kv.pool, carry, counters


def counted(kind: str, impl=step_impl):
  """`impl` that counts its traces in `TRACE_COUNTS[kind]`."""

  @functools.wraps(impl)
  def wrapper(*args):
    TRACE_COUNTS[kind] += 1
    return impl(*args)
  return wrapper


def jit_step(impl):
  """Jits a step function: graphdef and spec static; carry, pool donated."""
  return jax.jit(impl, static_argnums=(0, 2), donate_argnums=(4, 5))


prefill_step = jit_step(counted("prefill"))
# The engine looks this up at call time; tests swap in their own wrapper.
decode_step = jit_step(counted("decode"))


def powers_of_two_upto(limit: int, start: int = 1) -> tuple[int, ...]:
  """`start, 2 start, 4 start, ...` below `limit`, then `limit` itself."""
  if limit < 1 or start < 1:
    raise ValueError(f"bucket limits must be >= 1, got {start}..{limit}.")
  buckets, size = [], start
  while size < limit:
    buckets.append(size)
    size *= 2
  buckets.append(limit)
  return tuple(buckets)


def bucket_for(size: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `size`."""
  for bucket in buckets:
    if bucket >= size:
      return bucket
  raise ValueError(f"size {size} exceeds the largest bucket {buckets[-1]}.")
