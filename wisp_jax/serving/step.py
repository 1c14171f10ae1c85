"""The one forward-and-sample step, shared by `generate` and the engine.

`step_impl` runs one forward pass of the decoder over `tokens` `[B, T]`
through a KV view (`KVCache` for `generate`, the engine's `PagedKV`), with
the expert source of `spec`, and samples each row's next token from the
logits at its last real position. `generate` and the engine jit the same
function; they differ only in their KV view and their sampling inputs.

Sampling is per row: greedy where the row's temperature is 0, otherwise a
categorical draw with key `fold_in(key(seed), counter)`, where `counter` is
0 for a request's first token and then the position of the token fed in
(prompt length + index - 1). So a row's samples depend on its own seed and
position only, not on its batch, padding or preemptions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from wisp_jax.models.experts import SourceSpec
from wisp_jax.models.kv_cache import KVView


@struct.dataclass
class Sampling:
  """Per-row sampling inputs of a step (traced arrays).

  Attributes:
    last: `[B]` int32 index in `T` of each row's last real token.
    seed: `[B]` uint32 sampling seed of each row.
    counter: `[B]` int32 folded into the row's key for this token.
    temperature: `[B]` float32, 0 for greedy.
    greedy: static; True when every row is greedy, so the step compiles
      without the sampler (`generate` at temperature 0).
  """
  last: jax.Array
  seed: jax.Array
  counter: jax.Array
  temperature: jax.Array
  greedy: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class StepOutput:
  """What a step returns.

  Attributes:
    token: `[B]` int32 next token of each row.
    logits: `[B, V]` float32 logits it was drawn from.
    kv: the KV view, advanced past this pass.
    carry: the expert source's new carry.
    routing_ids: `[L, B, T, K]` int32.
    routing_weights: `[L, B, T, K]`.
    counters: `[3, L]` int32 cumulative (hits, misses, loads) of the source.
    finite: `[B]` bool, whether every logit of the row is finite (a row
      that is not sampled garbage; checked here so the engine reads `B`
      flags, not `[B, V]` logits).
  """
  token: jax.Array
  logits: jax.Array
  kv: KVView
  carry: object
  routing_ids: jax.Array
  routing_weights: jax.Array
  counters: jax.Array
  finite: jax.Array


def sample_rows(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token of each row: `[B, V]` float32 logits -> `[B]` int32."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if sampling.greedy:
    return greedy

  def draw(row_seed, row_counter, row_logits, row_temperature):
    key = jax.random.fold_in(jax.random.key(row_seed), row_counter)
    return jax.random.categorical(key, row_logits / row_temperature)

  sampled = jax.vmap(draw)(sampling.seed, sampling.counter, logits,
                           jnp.maximum(sampling.temperature, 1e-6))
  return jnp.where(sampling.temperature > 0, sampled.astype(jnp.int32),
                   greedy)


def step_impl(graphdef: nnx.GraphDef, state: nnx.State, spec: SourceSpec,
              arrays, carry, kv: KVView, tokens: jax.Array,
              sampling: Sampling) -> StepOutput:
  """One forward pass over `tokens` `[B, T]` and a sample per row."""
  decoder = nnx.merge(graphdef, state)
  out = decoder.forward(tokens, None, kv, spec.build(arrays), carry)
  # [B, 1, V] logits at each row's last real token.
  last = sampling.last[:, None, None]
  logits = jnp.take_along_axis(out.logits, last, axis=1)[:, 0].astype(
      jnp.float32)
  return StepOutput(
      token=sample_rows(logits, sampling), logits=logits,
      kv=out.kv.advance(tokens.shape[1]), carry=out.carry,
      routing_ids=out.routing_ids, routing_weights=out.routing_weights,
      counters=jnp.stack(spec.counters(out.carry)),
      finite=jnp.all(jnp.isfinite(logits), axis=-1))


def jit_step(impl=step_impl):
  """Jits a step function: graphdef and spec static; carry and KV view
  donated (updated in place)."""
  return jax.jit(impl, static_argnums=(0, 2), donate_argnums=(4, 5))


def counted(counts, kind: str, impl=step_impl):
  """`impl` that counts its traces in `counts[kind]`."""

  @functools.wraps(impl)
  def wrapper(*args):
    counts[kind] += 1
    return impl(*args)
  return wrapper
