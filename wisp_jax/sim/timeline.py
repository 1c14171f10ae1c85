"""A per-layer timeline of forward steps: device compute, and expert copies
on one shared host-to-device link.

For each step t and layer l the device runs, in order,

  attention + router   A = max(dense flops / bf16_flops,
                               (dense layer bytes + KV bytes read) / HBM)
  experts              X = max(2 x expert params x tokens x K / bf16_flops,
                               needed experts x expert bytes / HBM)

and after the last layer the LM head (the same roofline over its weights)
and the profile's fixed per-step overhead. Expert copies cross ONE link of
`h2d_bytes_per_s`, first come first served (a copy never preempts another;
bandwidth is shared, not free):

  * demand copies of layer l are issued when l has routed (after A) and
    layer l's experts start only when they have arrived: the critical path;
  * next-layer prefetch copies into layer l+1 (cooccur, gate, oracle) are
    issued when layer l has routed, right after l's demand copies; they
    overlap l's experts and l+1's attention, and delay whatever is queued
    behind them;
  * next-step prefetch copies into layer l (temporal) are issued after l's
    demand copies and land during the rest of the step (or later);
  * a layer whose experts use a prefetched expert still in flight (the
    replay's `wait` row) starts only when that copy batch has arrived.

Attention FLOPs are left out, as in `wisp_jax.sim.cost` (small next to the
weights at decode). Compared with `cost.step_cost`, which takes one roofline
over the whole step, this sums a roofline per layer (>= the step's when the
bound switches between layers); with no copies and every part HBM-bound
the two agree. `cost.step_cost(..., overlap=True)` (copies hidden behind
all compute) stays the upper bound.

Everything is vectorised over a leading axis of configurations (e.g.
policies x predictors x capacities of one trace); the steps and layers run
in order.

Shape legend: C configurations, S steps, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from wisp_jax.models.config import MoEConfig
from wisp_jax.sim import cost
from wisp_jax.sim.hardware import HardwareProfile, get_profile


@dataclasses.dataclass(frozen=True)
class DeviceTimes:
  """Device-side time of each piece of each step (seconds).

  Attributes:
    attention: `[S, L]` attention + router + norms (+ shared expert).
    experts: `[S, L]` routed experts.
    head: `[S]` final norm and LM head.
    overhead: fixed per-step time.
    copy_s: seconds one expert takes on the link.
  """
  attention: np.ndarray
  experts: np.ndarray
  head: np.ndarray
  overhead: float
  copy_s: float

  @property
  def compute_s(self) -> np.ndarray:
    """`[S]` device time of each step with no copy on its path."""
    return (self.attention.sum(axis=1) + self.experts.sum(axis=1)
            + self.head + self.overhead)


def layer_dense_params(config: MoEConfig) -> int:
  """Parameters of one layer outside its routed experts (attention, norms,
  router, shared expert)."""
  c = config
  embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  return (cost.dense_param_count(c) - embeddings - c.d_model) // c.num_layers


def device_times(config: MoEConfig,
                 profile: str | Mapping[str, Any] | HardwareProfile,
                 tokens: np.ndarray, needed: np.ndarray, *,
                 context_len: int, prefill: np.ndarray | None = None,
                 bytes_per_param: float = 2,
                 expert_bytes_per_param: float | None = None,
                 kv_bytes_per_value: float | None = None) -> DeviceTimes:
  """The device terms of every step of a replayed trace.

  Args:
    config: the model (sizes).
    profile: hardware profile, its name or a dict of its fields.
    tokens: `[S]` tokens per step.
    needed: `[S, L]` distinct experts each layer computes.
    context_len: KV tokens each decode token reads per layer.
    prefill: `[S]` bool prefill steps (they read no cached KV).
    bytes_per_param: dense weight width.
    expert_bytes_per_param: expert width (default `bytes_per_param`).
    kv_bytes_per_value: KV width (default `bytes_per_param`).

  Returns:
    the `DeviceTimes`.
  """
  hw = get_profile(profile)
  c = config
  tokens = np.asarray(tokens, np.float64)
  needed = np.asarray(needed, np.float64)
  if needed.ndim != 2 or needed.shape != (tokens.size, c.num_layers):
    raise ValueError(f"needed must be [S={tokens.size}, L={c.num_layers}], "
                     f"got {needed.shape}.")
  expert_width = (bytes_per_param if expert_bytes_per_param is None
                  else expert_bytes_per_param)
  kv_width = bytes_per_param if kv_bytes_per_value is None else (
      kv_bytes_per_value)
  one_expert = cost.expert_bytes(c, expert_width)
  dense = layer_dense_params(c)
  kv_per_token_layer = cost.kv_bytes_per_token(c, kv_width) / c.num_layers
  rows = tokens if prefill is None else np.where(prefill, 0.0, tokens)
  kv = rows * context_len * kv_per_token_layer  # [S]
  attention = np.maximum(2.0 * dense * tokens / hw.bf16_flops,
                         (dense * bytes_per_param + kv) / hw.hbm_bytes_per_s)
  attention = np.broadcast_to(attention[:, None], needed.shape).copy()
  experts = np.maximum(
      2.0 * c.expert_params * c.top_k * tokens[:, None] / hw.bf16_flops,
      needed * one_expert / hw.hbm_bytes_per_s)
  head_params = c.vocab_size * c.d_model + c.d_model
  head = np.maximum(2.0 * head_params * tokens / hw.bf16_flops,
                    head_params * bytes_per_param / hw.hbm_bytes_per_s)
  return DeviceTimes(attention=attention, experts=experts, head=head,
                     overhead=hw.step_overhead_s,
                     copy_s=one_expert / hw.h2d_bytes_per_s)


def simulate(times: DeviceTimes, loads: np.ndarray,
             prefetch: np.ndarray | None = None,
             wait: np.ndarray | None = None,
             next_step: np.ndarray | bool = False) -> np.ndarray:
  """Step times of C configurations run on the same device terms.

  Args:
    times: the device terms (`device_times`).
    loads: `[C, S, L]` demand copies per step and layer.
    prefetch: `[C, S, L]` prefetch copies into layer l issued in step t
      (default none).
    wait: `[C, S, L]` bool: layer l's experts at step t use the copy batch
      last prefetched into l (default never).
    next_step: `[C]` bool (or one bool): configuration c prefetches for the
      next step (issued at layer l's routing) rather than the next layer
      (issued at layer l-1's routing).

  Returns:
    `[C, S]` float64 seconds of each step.
  """
  loads = np.asarray(loads, np.float64)
  if loads.ndim == 2:
    loads = loads[None]
  num_configs, num_steps, num_layers = loads.shape
  if times.attention.shape != (num_steps, num_layers):
    raise ValueError(f"loads are [C, S={num_steps}, L={num_layers}] but the "
                     f"device terms are {times.attention.shape}.")
  prefetch = (np.zeros_like(loads) if prefetch is None
              else np.broadcast_to(np.asarray(prefetch, np.float64),
                                   loads.shape))
  wait = (np.zeros(loads.shape, bool) if wait is None
          else np.broadcast_to(np.asarray(wait, bool), loads.shape))
  later = np.broadcast_to(np.asarray(next_step, bool), (num_configs,))
  copy = times.copy_s
  dev = np.zeros(num_configs)
  link = np.zeros(num_configs)
  # Arrival of the last prefetch batch into each layer.
  landed = np.zeros((num_configs, num_layers))
  out = np.empty((num_configs, num_steps))
  for t in range(num_steps):
    start = dev.copy()
    for l in range(num_layers):
      routed = dev + times.attention[t, l]
      demand = loads[:, t, l]
      link = np.where(demand > 0, np.maximum(link, routed) + demand * copy,
                      link)
      ready = np.where(demand > 0, link, routed)
      ready = np.where(wait[:, t, l], np.maximum(ready, landed[:, l]), ready)
      # Next-layer prefetch into l+1, then next-step prefetch into l.
      if l + 1 < num_layers:
        ahead = np.where(later, 0.0, prefetch[:, t, l + 1])
        link = np.where(ahead > 0, np.maximum(link, routed) + ahead * copy,
                        link)
        landed[:, l + 1] = np.where(ahead > 0, link, landed[:, l + 1])
      own = np.where(later, prefetch[:, t, l], 0.0)
      link = np.where(own > 0, np.maximum(link, routed) + own * copy, link)
      landed[:, l] = np.where(own > 0, link, landed[:, l])
      dev = np.maximum(routed, ready) + times.experts[t, l]
    dev = dev + times.head[t] + times.overhead
    out[:, t] = dev - start
  return out


def tokens_per_s(step_s: np.ndarray, tokens: np.ndarray,
                 steps: np.ndarray | None = None) -> np.ndarray:
  """`[C]` tokens / seconds over the chosen steps (`[S]` bool, default
  all) of `[C, S]` step times."""
  tokens = np.asarray(tokens, np.float64)
  mask = np.ones(tokens.shape, bool) if steps is None else np.asarray(steps)
  seconds = step_s[:, mask].sum(axis=1)
  return np.where(seconds > 0, tokens[mask].sum() / np.maximum(seconds,
                                                               1e-30), 0.0)
