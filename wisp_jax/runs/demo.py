"""The paging demo: `run(config, workdir)`; see configs/demo.py.

Generates from real-text prompts with the chosen expert source and with
the resident reference, checks that their tokens are equal, and reports
hit rate, bytes moved per decoded token and decode tokens/s of both
(measured after a warm-up that compiles every step: the decode time is a
full run's minus a one-token run's). Writes `config.json` and
`summary.json`.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from wisp_jax import data
from wisp_jax.models import pretrained
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.serving.budget import Footprint
from wisp_jax.serving.generate import generate, padded_shapes

GIB = 2**30


def parse_slots(value) -> int | tuple[int, ...]:
  """`4` or `"4"` -> 4; `"2,3,4,4"` or a sequence -> a per-layer tuple."""
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
      values = [int(p) for p in parts]
    except ValueError:
      raise ValueError(f"slots_per_layer={value!r} is not an int or a "
                       "comma-separated list of ints (e.g. 4 or 2,3,4,4)."
                       ) from None
    if not values:
      raise ValueError("slots_per_layer is empty; give an int or a list.")
    return values[0] if len(values) == 1 else tuple(values)
  return tuple(int(v) for v in value)


def slots_for_budget(model: MoEModel, budget_bytes: int, batch: int,
                     cache_len: int) -> int:
  """Uniform slots per layer that fit `budget_bytes` next to the dense
  weights and a contiguous KV cache of `batch` x `cache_len` tokens."""
  c = model.config
  f = Footprint.of_model(model, block_size=1)
  kv = batch * cache_len * f.block_bytes
  left = budget_bytes - f.dense_bytes - kv
  slots = min(max(left, 0) // (c.num_layers * f.expert_bytes), c.num_experts)
  if slots < c.top_k:
    need = f.dense_bytes + kv + c.num_layers * c.top_k * f.expert_bytes
    raise ValueError(
        f"a budget of {reports.format_bytes(budget_bytes)} leaves "
        f"{int(slots)} expert slots per layer after the dense weights "
        f"({reports.format_bytes(f.dense_bytes)}) and the KV cache "
        f"({reports.format_bytes(kv)}); top_k={c.top_k} needs at least "
        f"{reports.format_bytes(need)} (--budget_gib={need / GIB:.6f}).")
  return int(slots)


def _timed(model, prompts, n, **kwargs):
  started = time.perf_counter()
  out = generate(model, prompts, n, **kwargs)
  return out, time.perf_counter() - started


def measure(model: MoEModel, prompts, max_new_tokens: int,
            **kwargs) -> tuple[Any, dict[str, Any]]:
  """One source: its output and its figures (compiles excluded)."""
  _timed(model, prompts, max_new_tokens, **kwargs)  # compile
  _timed(model, prompts, 1, **kwargs)
  out, full_s = _timed(model, prompts, max_new_tokens, **kwargs)
  _, prefill_s = _timed(model, prompts, 1, **kwargs)
  decode_s = max(full_s - prefill_s, 1e-9)
  stats = out.stats
  tokens = len(prompts) * (max_new_tokens - 1)
  hits = int(stats.per_pass_hits[1:].sum())
  misses = int(stats.per_pass_misses[1:].sum())
  loads = int(stats.per_pass_loads[1:].sum())
  return out, {
      "experts": kwargs.get("experts", "resident"),
      "slots_per_layer": kwargs.get("slots_per_layer"),
      "policy": kwargs.get("policy") if kwargs.get("experts") == "paged"
                else None,
      "decode_hit_rate": (hits / (hits + misses) if hits + misses else None),
      "bytes_per_token": loads * stats.bytes_per_expert / max(tokens, 1),
      "tokens_per_s": tokens / decode_s, "prefill_s": prefill_s}


def table(summary: dict[str, Any]) -> str:
  rows = []
  for r in summary["results"]:
    slots = r["slots_per_layer"]
    rows.append([r["experts"] + (f" ({r['policy']})" if r["policy"] else ""),
                 "-" if slots is None else
                 (",".join(map(str, slots)) if isinstance(slots, list)
                  else slots),
                 r["decode_hit_rate"], f"{r['bytes_per_token']:,.0f}",
                 f"{r['tokens_per_s']:,.1f}"])
  head = ["source", "slots", "hit rate", "bytes/token", "tokens/s"]
  same = "equal" if summary["same_tokens_as_resident"] else "DIFFERENT"
  return (reports.text_table(head, rows) +
          f"\ntokens vs resident: {same}; decode of {summary['batch']} x "
          f"{summary['max_new_tokens'] - 1} tokens on {summary['machine']}, "
          f"{summary['dtype']}, compiles excluded.")


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Runs the demo; returns its summary (prints as the comparison table)."""
  reports.start_logging()
  if config.experts not in ("paged", "resident", "static_offload",
                            "transient"):
    raise ValueError(f"experts={config.experts!r}; use paged, resident, "
                     "static_offload or transient.")
  if config.budget_gib > 0 and config.experts != "paged":
    raise ValueError(f"budget_gib sets the slots of experts='paged', not "
                     f"{config.experts!r}.")
  slots = parse_slots(config.slots_per_layer)
  out_dir = common.start(workdir, config)
  model = pretrained.from_pretrained(config.model, dtype=jnp.float32)
  texts = data.sample_prompts(config.first_prompt + config.num_prompts,
                              config.prompt_bytes)[config.first_prompt:]
  prompts = [data.encode(t) % model.config.vocab_size for t in texts]
  n = config.max_new_tokens
  if config.budget_gib > 0:
    _, cache = padded_shapes(model.config, max(len(p) for p in prompts), n)
    slots = slots_for_budget(model, int(config.budget_gib * GIB),
                             len(prompts), cache)
  sampling = dict(temperature=config.temperature, seed=config.seed)
  reference, resident = measure(model, prompts, n, **sampling)
  results = [resident]
  out = reference
  if config.experts != "resident":
    bank = bank_lib.make_bank(model.experts.weights())
    source = dict(experts=config.experts, bank=bank)
    if config.experts == "paged":
      source.update(slots_per_layer=slots, policy=config.policy)
    out, row = measure(model, prompts, n, **sampling, **source)
    row["slots_per_layer"] = (list(slots) if isinstance(slots, tuple)
                              else row["slots_per_layer"])
    results.append(row)
  continuations = [data.decode(row) for row in out.tokens]
  summary = {
      "model": model.config.name, "dtype": str(model.dtype),
      "machine": reports.this_machine(), "batch": len(prompts),
      "max_new_tokens": n, "budget_gib": config.budget_gib,
      "same_tokens_as_resident": bool(np.array_equal(out.tokens,
                                                     reference.tokens)),
      "prompts": texts, "continuations": continuations,
      "results": results[::-1]}
  common.finish(out_dir, summary)
  shown = "".join(f"\n=== prompt {i} ===\n{t}=== continuation ===\n{c}\n"
                  for i, (t, c) in enumerate(zip(texts, continuations)))
  return reports.Report(summary, shown + "\n" + table(summary))
