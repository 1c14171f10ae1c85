"""Recording routing traces from a model: `record`, `record_default`.

`record` serves prompts in waves of `batch_size` with
`generate(..., record_routing=True)` and concatenates the waves into one
`RoutingTrace`: wave w's forward passes follow wave w-1's (steps are offset),
request ids are the prompt indices. By default each wave's prompts are cut
to the shortest one's length (their beginnings are kept), so no row is
left-padded and the trace holds exactly the tokens the live pager routed
(`traces.trace.from_generate` drops padding tokens, which the live model
does route).

`wisp_jax.runs.record` is the experiment (configs/record.py).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from wisp_jax import data
from wisp_jax.traces.trace import RoutingTrace, from_generate

def concatenate(traces: Sequence[RoutingTrace], source: str = ""
                ) -> RoutingTrace:
  """Traces one after another: steps of each follow the previous one's."""
  if not traces:
    raise ValueError("concatenate needs at least one trace.")
  first = traces[0]
  for i, trace in enumerate(traces):
    if (trace.num_experts, trace.num_layers, trace.top_k) != (
        first.num_experts, first.num_layers, first.top_k):
      raise ValueError(
          f"trace {i} has (E, L, K) = ({trace.num_experts}, "
          f"{trace.num_layers}, {trace.top_k}); trace 0 has "
          f"({first.num_experts}, {first.num_layers}, {first.top_k}).")
  steps, offset = [], 0
  for trace in traces:
    if trace.num_tokens:
      steps.append(trace.step - trace.step.min() + offset)
      offset = int(steps[-1].max()) + 1
    else:
      steps.append(trace.step)
  cat = lambda name: np.concatenate([getattr(t, name) for t in traces])
  return RoutingTrace(
      step=np.concatenate(steps), request=cat("request"), phase=cat("phase"),
      position=cat("position"), ids=cat("ids"), weights=cat("weights"),
      num_experts=first.num_experts, model=first.model,
      source=source or first.source)


def record(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           batch_size: int, *, equal_length: bool = True,
           temperature: float = 0.0, seed: int = 0,
           source: str = "wisp_jax.serving.record") -> RoutingTrace:
  """Runs `generate` over `prompts` in waves and records the routing.

  Args:
    model: a `MoEModel`.
    prompts: token-id sequences.
    max_new_tokens: tokens generated per prompt.
    batch_size: prompts served together (rows of a wave).
    equal_length: cut each wave's prompts to its shortest prompt, so no
      row is padded and replay equals the live pager exactly.
    temperature: 0 for greedy decoding, > 0 to sample.
    seed: prompt i samples like a lone request with seed `seed + i` (what
      the serving engine draws for it).
    source: provenance stored in the trace.

  Returns:
    the trace; requests are numbered by prompt index.
  """
  from wisp_jax.serving.generate import generate  # Heavy, load lazily.
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if not prompts:
    raise ValueError("record needs at least one prompt.")
  waves = []
  for first in range(0, len(prompts), batch_size):
    rows = [np.asarray(p, np.int64) for p in prompts[first:first +
                                                      batch_size]]
    if equal_length:
      shortest = min(row.size for row in rows)
      rows = [row[:shortest] for row in rows]
    out = generate(model, rows, max_new_tokens, temperature, seed + first,
                   record_routing=True)
    waves.append(from_generate(out, model.config, request_ids=np.arange(
        first, first + len(rows)), source=source))
  return concatenate(waves, source)


def real_text_prompts(num_prompts: int, max_bytes: int) -> list[np.ndarray]:
  """`num_prompts` held-out stdlib function openings, as byte token ids."""
  return [data.encode(text)
          for text in data.sample_prompts(num_prompts, max_bytes)]


def record_default(num_prompts: int = 8, max_prompt_bytes: int = 160,
                   max_new_tokens: int = 64, batch_size: int = 4,
                   equal_length: bool = True) -> RoutingTrace:
  """Records the shipped default model on real-text prompts.

  Args:
    num_prompts: prompts (`wisp_jax.data.sample_prompts`).
    max_prompt_bytes: longest prompt, in bytes (= tokens).
    max_new_tokens: tokens generated per prompt.
    batch_size: prompts served together.
    equal_length: see `record`.

  Returns:
    the trace (model "default").
  """
  from wisp_jax.models.default import load_default  # Heavy, load lazily.
  model = load_default()
  source = (f"wisp_jax.serving.record.record_default(num_prompts="
            f"{num_prompts}, max_prompt_bytes={max_prompt_bytes}, "
            f"max_new_tokens={max_new_tokens}, batch_size={batch_size})")
  return record(model, real_text_prompts(num_prompts, max_prompt_bytes),
                max_new_tokens, batch_size, equal_length=equal_length,
                source=source)


def summarize(trace: RoutingTrace) -> dict[str, Any]:
  """Sizes and per-layer routing entropy (bits) of a trace."""
  entropy = []
  for layer in range(trace.num_layers):
    counts = np.bincount(trace.ids[:, layer].ravel(),
                         minlength=trace.num_experts)
    p = counts[counts > 0] / max(counts.sum(), 1)
    entropy.append(float(-(p * np.log2(p)).sum()))
  return {"model": trace.model, "source": trace.source,
          "num_events": trace.num_events, "num_tokens": trace.num_tokens,
          "num_steps": trace.num_steps, "num_layers": trace.num_layers,
          "num_experts": trace.num_experts, "top_k": trace.top_k,
          "num_requests": int(np.unique(trace.request).size),
          "expert_entropy_bits": entropy}
