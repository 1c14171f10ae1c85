"""Prefill + jitted incremental decode of a padded batch of prompts.

`generate` left-pads the prompts, runs one jitted prefill, then one jitted
decode step per new token; both are `serving.step.step_impl`, the step the
serving engine runs too. The decode step is traced once per (batch, cache
length, source) and reused for every step: the cache index, sampling
inputs and source state are traced arrays, never Python values, and every
host/device move is explicit (the step runs under
`jax.transfer_guard("disallow")`).

Sampling: row b of a batch samples like a lone request with seed
`seed + b` (see `serving.step`), so equal prompts in one batch draw
different samples, and a one-prompt call draws what the engine draws for
the same request.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from wisp_jax.models.kv_cache import KVCache
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging.api import ExpertStats
from wisp_jax.serving import step as step_lib


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


prefill_step = step_lib.jit_step()
# The decode step; tests swap in a trace-counting wrapper.
decode_step = step_lib.jit_step()


def _sampling(batch: int, last: int, seed: int, counter: np.ndarray,
              temperature: float) -> step_lib.Sampling:
  """Row b samples like a lone request with seed `seed + b`."""
  seeds = (np.uint64(seed) + np.arange(batch, dtype=np.uint64)) % 2**32
  return jax.device_put(step_lib.Sampling(
      last=np.full((batch,), last, np.int32), seed=seeds.astype(np.uint32),
      counter=np.asarray(counter, np.int32),
      temperature=np.full((batch,), temperature, np.float32),
      greedy=temperature == 0))


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
    seed: sampling seed (same seed, same samples); row b uses `seed + b`.
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

  out = prefill_step(
      graphdef, state, spec, arrays, carry, kv, jax.device_put(tokens),
      _sampling(batch, prompt_len - 1, seed, np.zeros((batch,)), temperature))
  out_tokens, out_logits = [out.token], [out.logits]
  routes, counters = [(out.routing_ids, out.routing_weights)], [out.counters]
  for i in range(1, max_new_tokens):
    # Each row's counter: the position of the token it feeds in.
    out = decode_step(
        graphdef, state, spec, arrays, out.carry, out.kv, out.token[:, None],
        _sampling(batch, 0, seed, prompt_len + i - 1 - start, temperature))
    out_tokens.append(out.token)
    counters.append(out.counters)
    if return_logits:
      out_logits.append(out.logits)
    if record_routing:
      routes.append((out.routing_ids, out.routing_weights))

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
