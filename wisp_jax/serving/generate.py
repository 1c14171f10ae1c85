"""Prefill + jitted incremental decode of a padded batch of prompts.

`generate` left-pads the prompts, runs one jitted prefill, then one jitted
decode step per new token. The decode step is traced once per (batch,
cache length, source) and reused for every step: the cache index, sampling
key and source state are traced arrays, never Python values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.models.experts import ResidentSpec, SourceSpec
from wisp_jax.models.kv_cache import KVCache
from wisp_jax.models.transformer import MoEModel


@dataclasses.dataclass
class GenerateOutput:
  """What `generate` returns.

  Attributes:
    tokens: `[B, max_new_tokens]` int32 generated tokens.
    logits: `[max_new_tokens, B, V]` float32 logits each token was drawn
      from (index 0: the prefill's last position), if requested.
    routing_ids: `[steps, L, B, T, K]`-like list, one `[L, B, T, K]` int32
      array per forward pass (prefill first), if requested.
    routing_weights: the matching gate weights, if requested.
    stats: the expert source's traffic statistics, if it keeps any.
    prompt_lengths: `[B]` int32 unpadded prompt lengths.
  """
  tokens: np.ndarray
  logits: np.ndarray | None = None
  routing_ids: list[np.ndarray] | None = None
  routing_weights: list[np.ndarray] | None = None
  stats: Any = None
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


def _forward(graphdef, state, spec: SourceSpec, arrays, carry, tokens, kv):
  decoder = nnx.merge(graphdef, state)
  positions = kv.positions(tokens.shape[1])
  logits, kv, carry, routing = decoder.forward(
      tokens, positions, kv, spec.build(arrays), carry)
  return logits[:, -1].astype(jnp.float32), kv.advance(tokens.shape[1]), carry, routing


@functools.partial(jax.jit, static_argnums=(0, 2, 8), donate_argnums=(4, 6))
def prefill_step(graphdef, state, spec, arrays, carry, tokens, kv, key,
                 greedy, temperature):
  """Runs the prompts `[B, P]`; returns first token, logits, cache, carry."""
  logits, kv, carry, routing = _forward(graphdef, state, spec, arrays, carry,
                                        tokens, kv)
  return _sample(logits, key, temperature, greedy), logits, kv, carry, routing


def decode_step_impl(graphdef, state, spec, arrays, carry, token, kv, key,
                     greedy, temperature):
  """One new token per row: `token` `[B]` in, next token `[B]` out."""
  logits, kv, carry, routing = _forward(graphdef, state, spec, arrays, carry,
                                        token[:, None], kv)
  return _sample(logits, key, temperature, greedy), logits, kv, carry, routing


decode_step = jax.jit(decode_step_impl, static_argnums=(0, 2, 8),
                      donate_argnums=(4, 6))


def split_decoder(model: MoEModel):
  """(graphdef, state) of the dense decoder, split once per call."""
  return nnx.split(model.decoder)


def generate(model: MoEModel, prompts, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, *,
             source: tuple[SourceSpec, Any, Any] | None = None,
             return_logits: bool = False,
             record_routing: bool = False) -> GenerateOutput:
  """Greedy or sampled continuation of a batch of prompts.

  Args:
    model: the MoE model.
    prompts: a list of token-id sequences (lengths may differ).
    max_new_tokens: tokens to generate per prompt.
    temperature: 0 for greedy decoding, > 0 to sample.
    seed: sampling seed (same seed, same samples).
    source: (spec, arrays, carry) of the expert source; resident if None.
    return_logits: keep the logits of every generated token.
    record_routing: keep the routing (ids, gate weights) of every pass.

  Returns:
    a `GenerateOutput`; `.carry` of the source is returned in `.stats` by
    sources that keep statistics.
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
  if source is None:
    source = (ResidentSpec(), model.experts.weights(), None)
  spec, arrays, carry = source
  graphdef, state = split_decoder(model)
  kv = KVCache.create(config.num_layers, batch, total, config.num_kv_heads,
                      config.head_dim, model.dtype, start)
  greedy = temperature == 0.0
  temp = jnp.float32(max(temperature, 1e-6))
  base_key = jax.random.key(seed)

  token, logits, kv, carry, routing = prefill_step(
      graphdef, state, spec, arrays, carry, jnp.asarray(tokens), kv,
      jax.random.fold_in(base_key, 0), greedy, temp)
  out_tokens, out_logits, routes = [token], [logits], [routing]
  for step in range(1, max_new_tokens):
    token, logits, kv, carry, routing = decode_step(
        graphdef, state, spec, arrays, carry, token, kv,
        jax.random.fold_in(base_key, step), greedy, temp)
    out_tokens.append(token)
    if return_logits:
      out_logits.append(logits)
    if record_routing:
      routes.append(routing)

  result = GenerateOutput(
      tokens=np.stack([np.asarray(t) for t in out_tokens], axis=1),
      prompt_lengths=(tokens.shape[1] - start).astype(np.int32))
  if return_logits:
    result.logits = np.stack([np.asarray(l) for l in out_logits])
  if record_routing:
    result.routing_ids = [np.asarray(r[0]) for r in routes]
    result.routing_weights = [np.asarray(r[1]) for r in routes]
  result.stats = getattr(spec, "stats", lambda c: None)(carry)
  return result
