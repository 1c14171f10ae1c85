"""Decode benchmark: tokens/s, step time, hit rate and traffic per source.

Step time is measured as the difference between two `generate` calls that
differ only in `max_new_tokens` (after both are compiled), divided by the
number of extra decode steps, so prefill and compilation drop out. Each
figure is the median of `repeats` such pairs, all taken in one run.
"""

from __future__ import annotations

import json
import statistics
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from wisp_jax.runs import common
from wisp_jax import data
from wisp_jax.models.config import get_config
from wisp_jax.models.default import load_default
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving.generate import generate


def _model(config: ml_collections.ConfigDict) -> MoEModel:
  dtype = jnp.dtype(config.dtype)
  if config.model == "default":
    return load_default(dtype=dtype)
  from flax import nnx  # Random weights for a synthetic preset.
  return MoEModel(get_config(config.model), rngs=nnx.Rngs(0), dtype=dtype)


def _prompts(config, vocab_size: int) -> list[np.ndarray]:
  texts = data.sample_prompts(config.batch, config.prompt_bytes)
  return [data.encode(t)[:config.prompt_bytes] % vocab_size for t in texts]


def measure(model: MoEModel, prompts, run: dict, short: int, long: int,
            repeats: int, bank) -> dict:
  """Times one source configuration; returns its figures."""
  kwargs = dict(run)
  name = kwargs.pop("name")
  if kwargs.get("hot_set") == "all":
    # Prewarmed with every expert: the pager at a 100% hit rate.
    c = model.config
    kwargs["hot_set"] = np.tile(np.arange(c.num_experts, dtype=np.int32),
                                (c.num_layers, 1))
  if kwargs.get("experts") != "resident":
    kwargs["bank"] = bank
  call = lambda n: generate(model, prompts, n, **kwargs)
  call(short), call(long)  # Compile both cache lengths.
  step_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    call(short)
    t1 = time.perf_counter()
    out = call(long)
    t2 = time.perf_counter()
    step_times.append(((t2 - t1) - (t1 - t0)) / (long - short))
  step = statistics.median(step_times)
  stats = out.stats
  decode_passes = slice(1, None)  # Pass 0 is the prefill.
  decode_loads = int(stats.per_pass_loads[decode_passes].sum())
  decode_hits = int(stats.per_pass_hits[decode_passes].sum())
  decode_misses = int(stats.per_pass_misses[decode_passes].sum())
  decode_tokens = (long - 1) * len(prompts)
  return {
      "name": name, "experts": run.get("experts"),
      "slots_per_layer": run.get("slots_per_layer"),
      "policy": run.get("policy"),
      "step_ms_median": 1e3 * step,
      "step_ms_all": [1e3 * s for s in step_times],
      "tokens_per_s": len(prompts) / step,
      "decode_hit_rate": decode_hits / max(decode_hits + decode_misses, 1),
      "bytes_per_token": decode_loads * stats.bytes_per_expert / decode_tokens,
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured source and writes `workdir/summary.json`."""
  workdir = common.start(workdir, config)
  model = _model(config)
  prompts = _prompts(config, model.config.vocab_size)
  bank = bank_lib.make_bank(model.experts.weights())
  results = []
  with open(common.metrics_path(workdir), "w") as metrics:
    for source in config.sources:
      row = measure(model, prompts, dict(source), config.short_tokens,
                    config.long_tokens, config.repeats, bank)
      results.append(row)
      metrics.write(json.dumps(row) + "\n")
      logging.info("%-16s %8.2f ms/step %9.1f tok/s  hit %.3f  %10.0f B/token",
                   row["name"], row["step_ms_median"], row["tokens_per_s"],
                   row["decode_hit_rate"], row["bytes_per_token"])
  resident = next(r for r in results if r["experts"] == "resident")
  for row in results:
    row["step_vs_resident"] = row["step_ms_median"] / resident["step_ms_median"]
  summary = {"model": model.config.name, "dtype": config.dtype,
             "batch": len(prompts), "results": results}
  common.finish(workdir, summary)
  header = (f"{'source':<16}{'S':>4}{'ms/step':>10}{'tok/s':>10}"
            f"{'x resident':>12}{'hit rate':>10}{'bytes/token':>14}")
  lines = [header] + [
      f"{r['name']:<16}{r['slots_per_layer'] or '-':>4}"
      f"{r['step_ms_median']:>10.3f}{r['tokens_per_s']:>10.1f}"
      f"{r['step_vs_resident']:>12.3f}{r['decode_hit_rate']:>10.3f}"
      f"{r['bytes_per_token']:>14.0f}" for r in results]
  print("\n".join(lines))
  return summary
