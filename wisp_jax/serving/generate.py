"""Prefill + jitted incremental decode of a padded batch of prompts.

`generate` left-pads the prompts, runs one jitted prefill, then one jitted
decode step per new token; both are `serving.step.step_impl`, the step the
serving engine runs too. The decode step is traced once per (batch, cache
length, source) and reused for every step: the cache index, sampling
inputs and source state are traced arrays, never Python values, and every
host/device move is explicit (the step runs under
`jax.transfer_guard("disallow")`).

Compile-aware shapes (`bucket=True`, the default): the prompt width P is
rounded up to a power of two (at least 8) and the cache length to the
next power of two of P + max_new_tokens (both capped by the model's
max_seq_len), so a new `max_new_tokens` or prompt length inside the same
bucket reuses the compiled prefill and decode steps. Padding is on the
left and is masked: real tokens never attend to it and their positions
start at 0, so the tokens generated do not depend on the bucket. Each pad
is a copy of its row's first real token and attends to itself alone, so
it routes exactly like that token: padding adds no expert demand, and the
pager's counters equal those of the unpadded batch. (Logits may differ in
the last bits from `bucket=False`, since reduction sizes change; every
expert source sees the same shapes, so paged logits stay `np.array_equal`
to resident ones.) Before each new compile an INFO line says what
compiles and, after it, how long it took.

Sampling: row b of a batch samples like a lone request with seed
`seed + b` (see `serving.step`), so equal prompts in one batch draw
different samples, and a one-prompt call draws what the engine draws for
the same request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from wisp_jax.models import tokenizer as tokenizer_lib
from wisp_jax.models.kv_cache import KVCache
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import api as paging_api
from wisp_jax.paging import bank as bank_lib
from wisp_jax.paging.api import ExpertStats
from wisp_jax.serving import step as step_lib

MIN_PROMPT_BUCKET = 8


@dataclasses.dataclass
class GenerateOutput:
  """What `generate` returns.

  Shapes are batch-major like `model(tokens)`: B rows, T = steps run
  (`max_new_tokens`, or fewer when every row stopped early), V vocabulary.

  Attributes:
    tokens: `[B, T]` int32 generated tokens. A row that stopped keeps
      emitting `pad_token_id` (default: the stop token it hit) after its
      `lengths[b]` tokens.
    lengths: `[B]` int32 tokens each row generated, its stop token included.
    finish_reason: per row, "stop" (hit a stop token) or "length".
    text: per row, the decoded continuation (stop token excluded), when the
      prompts were given as text; else None.
    logits: `[B, T, V]` float32 logits each token was drawn from (index 0:
      the prefill's last position), if requested.
    routing_ids: if requested, one `[L, B, T', K]` int32 array per forward
      pass: the prefill over the left-padded prompts (T' = the padded
      prompt width), then one per decode step (T' = 1).
    routing_weights: the matching gate weights.
    stats: host-to-device expert traffic of the call.
    prompt_lengths: `[B]` int32 unpadded prompt lengths.
    prompt_width: the padded prompt width (the prefill's T').
    cache_length: the KV cache length the steps were compiled for.
    routing_lookahead: with `record_routing` and prefetch `gate`, one
      `[L, B, T', K]` int32 array per pass: the lookahead's top-k for layer
      l+1 made at layer l (-1 for the last layer).
  """
  tokens: np.ndarray
  logits: np.ndarray | None = None
  routing_ids: list[np.ndarray] | None = None
  routing_weights: list[np.ndarray] | None = None
  stats: ExpertStats | None = None
  prompt_lengths: np.ndarray | None = None
  lengths: np.ndarray | None = None
  finish_reason: list[str] | None = None
  text: list[str] | None = None
  prompt_width: int = 0
  cache_length: int = 0
  routing_lookahead: list[np.ndarray] | None = None


def bucket_length(n: int, minimum: int = 1) -> int:
  """The power of two >= max(n, minimum)."""
  return 1 << (max(int(n), int(minimum)) - 1).bit_length()


def padded_shapes(config, longest: int, max_new_tokens: int,
                  bucket: bool = True) -> tuple[int, int]:
  """(prompt width, cache length) `generate` compiles for (see the module
  docstring); both exact when `bucket` is False."""
  if not bucket:
    return longest, longest + max_new_tokens
  width = min(bucket_length(longest, MIN_PROMPT_BUCKET),
              config.max_seq_len - max_new_tokens)
  return width, min(bucket_length(width + max_new_tokens), config.max_seq_len)


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to `[B, width]` (default: the longest prompt).

  Each pad is a copy of its row's first token (see the module docstring).

  Returns:
    tokens `[B, width]` int32 and each row's start `[B]` int32.
  """
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
  width = longest if width is None else max(int(width), longest)
  tokens = np.zeros((len(rows), width), np.int32)
  start = np.zeros((len(rows),), np.int32)
  for i, row in enumerate(rows):
    start[i] = width - row.size
    tokens[i, :start[i]] = row[0]
    tokens[i, start[i]:] = row
  return tokens, start


prefill_step = step_lib.jit_step()
# The decode step; tests swap in a trace-counting wrapper.
decode_step = step_lib.jit_step()


@jax.jit
def _finish(token, done, stop_ids, pad):
  """Stop-token bookkeeping of one step, on device.

  Args:
    token: `[B]` int32 sampled tokens.
    done: `[B]` bool rows that stopped before this step.
    stop_ids: `[S]` int32 stop tokens.
    pad: `[B]` int32 what stopped rows emit.

  Returns:
    the tokens to emit and feed back, the new `done`.
  """
  token = jnp.where(done, pad, token)
  return token, done | jnp.any(token[:, None] == stop_ids[None, :], axis=1)


def _sampling(batch: int, last: int, seed: int, counter: np.ndarray,
              temperature: float) -> step_lib.Sampling:
  """Row b samples like a lone request with seed `seed + b`."""
  seeds = (np.uint64(seed) + np.arange(batch, dtype=np.uint64)) % 2**32
  return jax.device_put(step_lib.Sampling(
      last=np.full((batch,), last, np.int32), seed=seeds.astype(np.uint32),
      counter=np.asarray(counter, np.int32),
      temperature=np.full((batch,), temperature, np.float32),
      greedy=temperature == 0))


# Signatures of the steps compiled so far, for the progress lines.
_COMPILED: set = set()


def _signature(args) -> tuple:
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple(
      (getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
       getattr(getattr(x, "sharding", None), "memory_kind", None))
      for x in leaves)


def _run_step(step, kind: str, what: str, graphdef, spec, *args):
  """`step(graphdef, ...)`, with INFO lines around a first compile."""
  key = (id(step), kind, graphdef, spec, _signature(args))
  if key in _COMPILED:
    return step(graphdef, args[0], spec, *args[1:])
  logging.info("compiling %s step for %s ...", kind, what)
  started = time.perf_counter()
  out = jax.block_until_ready(step(graphdef, args[0], spec, *args[1:]))
  _COMPILED.add(key)
  logging.info("compiled %s step for %s in %.1f s", kind, what,
               time.perf_counter() - started)
  return out


def read_split(split) -> tuple[int, ...]:
  """Slots per layer of a split: a `split.json` path, a dict or an object
  with `slots_per_layer` (`wisp_jax.alloc.split.Split`)."""
  if isinstance(split, (str, os.PathLike)):
    path = pathlib.Path(split)
    if not path.is_file():
      raise FileNotFoundError(
          f"split file {str(path)!r} does not exist; experiments/allocate.py "
          "writes workdir/split.json.")
    split = json.loads(path.read_text())
  slots = (split.get("slots_per_layer") if isinstance(split, dict)
           else getattr(split, "slots_per_layer", None))
  if slots is None:
    raise ValueError(f"split {split!r} has no slots_per_layer; pass a "
                     "split.json path, a dict or an alloc.split.Split.")
  return tuple(int(s) for s in np.asarray(slots).reshape(-1))


def _check_slots(config, slots_per_layer) -> None:
  """A per-layer list must have one entry per layer of this model."""
  values = np.asarray(slots_per_layer)
  if values.ndim == 1 and values.size != config.num_layers:
    raise ValueError(
        f"slots_per_layer has {values.size} values {values.tolist()}, but "
        f"model {config.name!r} has {config.num_layers} layers; pass one "
        f"int (every layer) or {config.num_layers} ints.")


def _token_prompts(model: MoEModel, prompts, tokenizer):
  """Token-id prompts, and the tokenizer when the prompts were text."""
  if isinstance(prompts, str) or (isinstance(prompts, np.ndarray)
                                  and prompts.ndim == 1):
    prompts = [prompts]
  if isinstance(prompts, np.ndarray) or not any(
      isinstance(p, str) for p in prompts):
    return prompts, None
  if not all(isinstance(p, str) for p in prompts):
    raise ValueError("prompts mix text and token ids; pass one kind.")
  tokenizer = tokenizer or tokenizer_lib.tokenizer_for(model)
  if tokenizer is None:
    c = model.config
    raise ValueError(
        f"the prompts are text, but model {c.name!r} (vocab_size="
        f"{c.vocab_size}) has no tokenizer: pass token ids, pass "
        "tokenizer=..., or load a Hugging Face directory that holds "
        "tokenizer.json with wisp_jax.from_pretrained.")
  return [tokenizer.encode(p) for p in prompts], tokenizer


def _stop_ids(model: MoEModel, stop_tokens, stop_at_eos: bool
              ) -> tuple[int, ...]:
  ids = [] if stop_tokens is None else list(np.atleast_1d(stop_tokens))
  if stop_at_eos:
    info = tokenizer_lib.model_info(model)
    if info is None or not info.eos_token_id:
      raise ValueError("stop_at_eos=True, but this model has no "
                       "eos_token_id (from_pretrained reads it from a Hugging "
                       "Face config.json); pass stop_tokens=[...] instead.")
    ids += list(info.eos_token_id)
  for token in ids:
    if not 0 <= int(token) < model.config.vocab_size:
      raise ValueError(f"stop token {int(token)} is outside [0, "
                       f"{model.config.vocab_size}).")
  return tuple(int(t) for t in ids)


def generate(model: MoEModel, prompts, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, *,
             experts: str = "resident", slots_per_layer=None,
             split=None, policy: str = "lru",
             policy_options: dict | None = None, hot_set=None,
             num_slots: int | None = None, bank=None,
             stop_tokens=None, stop_at_eos: bool = False,
             pad_token_id: int | None = None, tokenizer=None,
             bucket: bool = True, return_logits: bool = False,
             record_routing: bool = False, prefetch: str | None = None,
             prefetch_options: dict | None = None) -> GenerateOutput:
  """Greedy or sampled continuation of a batch of prompts.

  Args:
    model: the MoE model.
    prompts: token-id sequences (lengths may differ; rows are left-padded),
      or text (a str or a list of str), encoded with the model's tokenizer
      (bytes for the byte-level default model, `tokenizer.json` for a
      Hugging Face directory); `out.text` then holds the continuations.
    max_new_tokens: most tokens to generate per prompt.
    temperature: 0 for greedy decoding, > 0 to sample.
    seed: sampling seed (same seed, same samples); row b uses `seed + b`.
    experts: where expert weights come from: `resident` (all on device,
      the reference), `static_offload`, `transient` or `paged`.
    slots_per_layer: device slots per layer for `paged` (int, or `[L]`).
    split: instead of `slots_per_layer`: a split from
      `experiments/allocate.py` (its `split.json` path, a dict or an
      `alloc.split.Split`); its KV blocks do not apply here (`generate`
      holds a contiguous cache).
    policy: paging policy (`lru`, `lfu`, `fifo`, `ws`, `pinned`).
    policy_options: e.g. `{"tau": 4}` for ws, `{"age_every": 16}` for lfu.
    hot_set: `[L, S]` experts kept by `pinned`.
    num_slots: slot rows per layer of the device buffer for `paged`
      (default: max of slots_per_layer); capacities below it share one
      compiled step.
    bank: a prebuilt host bank (`wisp_jax.paging.bank.make_bank`, or
      `make_compressed_bank` for bf16 models: copies cross compressed and
      are decoded on the device; `transient` and `paged` only; or
      `make_tiered_bank`: a compressed device tier too, `paged` only);
      built from the model's experts when omitted.
    stop_tokens: token id(s) that end a row (the stop token is emitted).
    stop_at_eos: also stop at the model's `eos_token_id` (read from its
      Hugging Face config.json by `from_pretrained`).
    pad_token_id: what a stopped row emits afterwards (default: its stop
      token). Generation ends early once every row has stopped.
    tokenizer: encodes text prompts (default: the model's own).
    bucket: round the prompt width and cache length up to powers of two
      (see the module docstring); False compiles for the exact shapes.
    return_logits: keep the logits of every generated token.
    record_routing: keep the routing (ids, gate weights) of every pass
      (and, with prefetch `gate`, the lookahead).
    prefetch: predictor whose experts `paged` copies ahead of need
      (`cooccur`, `temporal`, `gate`; see `wisp_jax.paging.predictors`).
    prefetch_options: `{"size": m, "limit": c}` per layer and step.

  Returns:
    a `GenerateOutput`.
  """
  config = model.config
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  if split is not None:
    if slots_per_layer is not None:
      raise ValueError("pass slots_per_layer or split, not both.")
    if experts != "paged":
      raise ValueError(f"split= sets the slots of experts='paged', but "
                       f"experts={experts!r}.")
    slots_per_layer = read_split(split)
  if slots_per_layer is not None and not isinstance(slots_per_layer, int):
    _check_slots(config, slots_per_layer)
  prompts, text_tokenizer = _token_prompts(model, prompts, tokenizer)
  stop_ids = _stop_ids(model, stop_tokens, stop_at_eos)
  longest = max(np.asarray(p).size for p in prompts) if len(prompts) else 0
  total = longest + max_new_tokens
  if total > config.max_seq_len:
    raise ValueError(
        f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) "
        f"= {total} exceeds the model's max_seq_len={config.max_seq_len}.")
  width, cache_len = padded_shapes(config, longest, max_new_tokens, bucket)
  tokens, start = pad_prompts(prompts, config.vocab_size, width)
  batch, prompt_len = tokens.shape
  if experts == "resident":
    bank = model.experts.weights()
  elif bank is None:
    bank = bank_lib.make_bank(model.experts.weights())
  elif ((bank_lib.is_compressed(bank) or bank_lib.is_tiered(bank)) and
        model.dtype != jnp.bfloat16):
    raise ValueError(f"a compressed bank holds bf16 experts; this model "
                     f"computes in {jnp.dtype(model.dtype).name}.")
  spec, arrays, carry = paging_api.make_source(
      config, bank, experts, slots_per_layer, policy, policy_options, hot_set,
      num_slots, prefetch, prefetch_options,
      model.decoder.layers.router[...] if experts == "paged" else None)
  # The gate lookahead travels in the carry, one pass at a time.
  lookahead = record_routing and prefetch == "gate"
  if lookahead:
    carry = spec.with_lookahead(carry, batch, prompt_len)

  graphdef, state = nnx.split(model.decoder)
  kv = KVCache.create(config.num_layers, batch, cache_len,
                      config.num_kv_heads, config.head_dim, model.dtype,
                      jax.device_put(start))
  what = f"batch {batch}, cache {cache_len} ({experts})"
  out = _run_step(
      prefill_step, "prefill", f"{prompt_len} prompt tokens x {what}",
      graphdef, spec, state, arrays, carry, kv, jax.device_put(tokens),
      _sampling(batch, prompt_len - 1, seed, np.zeros((batch,)), temperature))
  token = out.token
  if stop_ids:
    stops = jax.device_put(np.asarray(stop_ids, np.int32))
    pad = jax.device_put(np.full((batch,), -1 if pad_token_id is None
                                 else pad_token_id, np.int32))
    done = jax.device_put(np.zeros((batch,), bool))
    token, done = _finish(token, done, stops, pad)
    if pad_token_id is None:  # a stopped row repeats its stop token
      pad = token
  out_tokens, out_logits = [token], [out.logits]
  routes, counters = [(out.routing_ids, out.routing_weights)], [out.counters]
  looks = [out.carry.lookahead] if lookahead else []
  for i in range(1, max_new_tokens):
    if stop_ids and bool(jax.device_get(jnp.all(done))):
      break
    # Each row's counter: the position of the token it feeds in.
    carry = (spec.with_lookahead(out.carry, batch, 1) if lookahead
             else out.carry)
    args = (state, arrays, carry, out.kv, token[:, None],
            _sampling(batch, 0, seed, prompt_len + i - 1 - start,
                      temperature))
    if i == 1:  # the first decode step may compile; later ones reuse it
      out = _run_step(decode_step, "decode", what, graphdef, spec, *args)
    else:
      out = decode_step(graphdef, args[0], spec, *args[1:])
    token = out.token
    if stop_ids:
      token, new_done = _finish(token, done, stops, pad)
      if pad_token_id is None:
        pad = jnp.where(done, pad, token)
      done = new_done
    out_tokens.append(token)
    counters.append(out.counters)
    if return_logits:
      out_logits.append(out.logits)
    if record_routing:
      routes.append((out.routing_ids, out.routing_weights))
    if lookahead:
      looks.append(out.carry.lookahead)

  prefetched = (spec.prefetch_counters(out.carry)
                if experts == "paged" and prefetch else None)
  tiered = spec.tier_loads(out.carry) if experts == "paged" else None
  out_tokens, out_logits, routes, counters, looks, prefetched, tiered = (
      jax.device_get((out_tokens, out_logits, routes, counters, looks,
                      prefetched, tiered)))
  generated = np.stack(out_tokens, axis=1)
  lengths, reasons = _lengths(generated, stop_ids)
  result = GenerateOutput(
      tokens=generated, lengths=lengths, finish_reason=reasons,
      prompt_lengths=(prompt_len - start).astype(np.int32),
      prompt_width=prompt_len, cache_length=cache_len,
      stats=paging_api.stats_from_counters(
          experts, counters, bank_lib.bytes_per_expert(bank), prefetched,
          tiered))
  if return_logits:
    result.logits = np.stack(out_logits, axis=1)
  if record_routing:
    result.routing_ids = [r[0] for r in routes]
    result.routing_weights = [r[1] for r in routes]
    if lookahead:
      result.routing_lookahead = list(looks)
  if text_tokenizer is not None:
    result.text = [text_tokenizer.decode(
        row[:n - (reason == "stop")]) for row, n, reason in zip(
            generated, lengths, reasons)]
  return result


def _lengths(tokens: np.ndarray, stop_ids: tuple[int, ...]
             ) -> tuple[np.ndarray, list[str]]:
  """Each row's generated length (stop token included) and why it ended."""
  batch, steps = tokens.shape
  lengths = np.full((batch,), steps, np.int32)
  reasons = ["length"] * batch
  if stop_ids:
    hit = np.isin(tokens, stop_ids)
    for b in range(batch):
      if hit[b].any():
        lengths[b] = int(np.argmax(hit[b])) + 1
        reasons[b] = "stop"
  return lengths, reasons
