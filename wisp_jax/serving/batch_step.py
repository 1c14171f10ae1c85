"""The engine's step inputs: rows of the KV pool packed into one batch.

One step function (`serving.step.step_impl`, the one `generate` runs too)
serves prefill (one request, `T` = a length bucket) and decode (`B` = a
batch bucket, `T` = 1). Everything that changes from step to step (tokens,
block tables, lengths, sampling seeds) is a traced array in a `StepInput`;
the shapes are fixed by the buckets, so the decode step compiles once per
batch bucket and the prefill step once per length bucket. The pool and the
expert source's carry are donated, so they update in place.

The engine sets each row's sampling `counter` to what `generate` would use
for that token of a lone request (0 for the first token, then prompt length
+ index - 1), so a request's samples do not depend on its batch or on
preemptions.

Shape legend as in `wisp_jax.models.moe` and `wisp_jax.serving.kv_pool`.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import numpy as np
from flax import struct

from wisp_jax.serving import step as step_lib
from wisp_jax.serving.kv_pool import KVPool, PagedKV
from wisp_jax.serving.scheduler import Row

# Traces of each step kind in this process ("prefill", "decode"); the jitted
# functions below are shared by every engine, so a trace happens once per
# (model structure, source, bucket) for the whole process.
TRACE_COUNTS: collections.Counter = collections.Counter()


@struct.dataclass
class StepInput:
  """The traced inputs of one step (all but the pool).

  Attributes:
    tokens: `[B, T]` int32 new tokens (padded with each row's last).
    block_table: `[B, MB]` int32 pool blocks of each row.
    length: `[B]` int32 positions of each row already in the pool.
    num_new: `[B]` int32 real tokens among the `T` of each row.
    write: `[B]` bool, False for batch-padding rows.
    sampling: per-row sampling inputs (`last` = num_new - 1).
  """
  tokens: jax.Array
  block_table: jax.Array
  length: jax.Array
  num_new: jax.Array
  write: jax.Array
  sampling: step_lib.Sampling

  def view(self, pool: KVPool) -> PagedKV:
    """The pool seen by this step's rows."""
    return PagedKV(pool=pool, block_table=self.block_table,
                   length=self.length, num_new=self.num_new, write=self.write)


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
  num_new = np.array([len(r.tokens) for r in padded], np.int32)
  return StepInput(
      tokens=tokens, block_table=table,
      length=np.array([r.length for r in padded], np.int32),
      num_new=num_new, write=np.arange(batch) < len(rows),
      sampling=step_lib.Sampling(
          last=np.maximum(num_new - 1, 0),
          seed=np.array([r.seed for r in padded], np.uint32),
          counter=np.array([r.counter for r in padded], np.int32),
          temperature=np.array([r.temperature for r in padded], np.float32)))


prefill_step = step_lib.jit_step(step_lib.counted(TRACE_COUNTS, "prefill"))
# The engine looks this up at call time; tests swap in their own wrapper.
decode_step = step_lib.jit_step(step_lib.counted(TRACE_COUNTS, "decode"))
