"""Prefill + jitted incremental decode of a padded batch of prompts.

`generate` left-pads the prompts, runs one jitted prefill, then one jitted
decode step per new token. The decode step is traced once per (batch,
cache length, source) and reused for every step: the cache index, sampling
key and source state are traced arrays, never Python values, and every
host/device move is explicit (the step runs under
`jax.transfer_guard("disallow")`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.models.experts import SourceSpec
from wisp_jax.models.kv_cache import KVCache
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging.api import ExpertStats


@dataclasses.dataclass
class GenerateOutput:
  """What `generate` returns.

  Attributes:
    tokens: `[B, max_new_tokens]` int32 generated tokens.
    logits: `[max_new_tokens, B, V]` float32 logits each token was drawn
      from (index 0: the prefill's last position), if requested.
    routing_ids: if requested, one `[L, B, T, K]` int32 array per forward
      pass: the prefill over the left-padded prompts (T = P), then one per
      decode step (T = 1).
    routing_weights: the matching gate weights.
    stats: host-to-device expert traffic of the call.
    prompt_lengths: `[B]` int32 unpadded prompt lengths.
  """
  tokens: np.ndarray
  logits: np.ndarray | None = None
  routing_ids: list[np.ndarray] | None = None
  routing_weights: list[np.ndarray] | None = None
  stats: ExpertStats | None = None
  prompt_lengths: np.ndarray | None = None


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to `[B, P]`; returns tokens and each row's start."""
  if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
    prompts = [prompts]
  if len(prompts) == 0:
    raise ValueError("generate needs at least one prompt.")
  rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
  for i, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs a token.")
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): "
                       f"min {row.min()}, max {row.max()}.")
  longest = max(row.size for row in rows)
  tokens = np.zeros((len(rows), longest), np.int32)
  start = np.zeros((len(rows),), np.int32)
  for i, row in enumerate(rows):
    start[i] = longest - row.size
    tokens[i, start[i]:] = row
  return tokens, start


def _sample(logits, key, temperature, greedy: bool):
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


def step_impl(graphdef, state, spec: SourceSpec, arrays, carry, tokens, kv,
              key, greedy: bool, temperature):
  """One forward pass over `tokens` `[B, T]` and a sample of the next token.

  Returns:
    next tokens `[B]`, last-position logits `[B, V]` float32, the cache, the
    source's carry, the routing `(ids, weights)` `[L, B, T, K]` and the
    source's cumulative counters `[3, L]` (hits, misses, loads).
  """
  decoder = nnx.merge(graphdef, state)
  positions = kv.positions(tokens.shape[1])
  logits, kv, carry, routing = decoder.forward(
      tokens, positions, kv, spec.build(arrays), carry)
  logits = logits[:, -1].astype(jnp.float32)
  key = jax.random.fold_in(key, kv.index)
  token = _sample(logits, key, temperature, greedy)
  counters = jnp.stack(spec.counters(carry))
  return token, logits, kv.advance(tokens.shape[1]), carry, routing, counters


_jit_step = functools.partial(jax.jit, static_argnums=(0, 2, 8),
                              donate_argnums=(4, 6))
prefill_step = _jit_step(step_impl)
# The decode step; tests swap in a trace-counting wrapper.
decode_step = _jit_step(step_impl)


def generate(model: MoEModel, prompts, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, *,
             experts: str = "resident", slots_per_layer=None,
             policy: str = "lru", policy_options: dict | None = None,
             hot_set=None, num_slots: int | None = None, bank=None,
             return_logits: bool = False,
             record_routing: bool = False) -> GenerateOutput:
  """Greedy or sampled continuation of a batch of prompts.

  Args:
    model: the MoE model.
    prompts: token-id sequences (lengths may differ; rows are left-padded).
    max_new_tokens: tokens to generate per prompt.
    temperature: 0 for greedy decoding, > 0 to sample.
    seed: sampling seed (same seed, same samples).
    experts: where expert weights come from: `resident` (all on device,
      the reference), `static_offload`, `transient` or `paged`.
    slots_per_layer: device slots per layer for `paged` (int, or `[L]`).
    policy: paging policy (`lru`, `lfu`, `fifo`, `ws`, `pinned`).
    policy_options: e.g. `{"tau": 4}` for ws, `{"age_every": 16}` for lfu.
    hot_set: `[L, S]` experts kept by `pinned`.
    num_slots: slot rows per layer of the device buffer for `paged`
      (default: max of slots_per_layer); capacities below it share one
      compiled step.
    bank: a prebuilt host bank (`wisp_jax.paging.bank.make_bank`); built
      from the model's experts when omitted.
    return_logits: keep the logits of every generated token.
    record_routing: keep the routing (ids, gate weights) of every pass.

  Returns:
    a `GenerateOutput`.
  """
  config = model.config
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  tokens, start = pad_prompts(prompts, config.vocab_size)
  batch, prompt_len = tokens.shape
  total = prompt_len + max_new_tokens
  if total > config.max_seq_len:
    raise ValueError(
        f"longest prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) "
        f"= {total} exceeds the model's max_seq_len={config.max_seq_len}.")
  if experts == "resident":
    bank = model.experts.weights()
  elif bank is None:
    bank = bank_lib.make_bank(model.experts.weights())
  spec, arrays, carry = paging_api.make_source(
      config, bank, experts, slots_per_layer, policy, policy_options, hot_set,
      num_slots)

  graphdef, state = nnx.split(model.decoder)
  kv = KVCache.create(config.num_layers, batch, total, config.num_kv_heads,
                      config.head_dim, model.dtype, jax.device_put(start))
  greedy = temperature == 0.0
  temp = jax.device_put(np.float32(max(temperature, 1e-6)))
  key = jax.random.key(jax.device_put(np.uint32(seed)))

  token, logits, kv, carry, routing, counts = prefill_step(
      graphdef, state, spec, arrays, carry, jax.device_put(tokens), kv, key,
      greedy, temp)
  out_tokens, out_logits, routes = [token], [logits], [routing]
  counters = [counts]
  for _ in range(1, max_new_tokens):
    token, logits, kv, carry, routing, counts = decode_step(
        graphdef, state, spec, arrays, carry, token[:, None], kv, key, greedy,
        temp)
    out_tokens.append(token)
    counters.append(counts)
    if return_logits:
      out_logits.append(logits)
    if record_routing:
      routes.append(routing)

  out_tokens, out_logits, routes, counters = jax.device_get(
      (out_tokens, out_logits, routes, counters))
  result = GenerateOutput(
      tokens=np.stack(out_tokens, axis=1),
      prompt_lengths=(prompt_len - start).astype(np.int32),
      stats=paging_api.stats_from_counters(
          experts, counters, bank_lib.bytes_per_expert(bank)))
  if return_logits:
    result.logits = np.stack(out_logits)
  if record_routing:
    result.routing_ids = [r[0] for r in routes]
    result.routing_weights = [r[1] for r in routes]
  return result
