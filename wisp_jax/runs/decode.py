"""Decode benchmark: step time, tokens/s, hit rate and traffic per source.

A source's step time is the difference between two `generate` calls that
differ only in `max_new_tokens` (both compiled first), divided by the extra
decode steps, so prefill and compilation drop out. The sources are
interleaved inside each repeat (`runs.timing.interleaved`): every ratio to
resident is taken within a repeat, and reported as its median with its
min-max spread. Each measurement is a line of `metrics.jsonl` as it
happens; a ratio whose repeats disagree by more than `max_spread` is
reported as no figure.

On CPU the host-to-device copies compile to nothing (one RAM): paged vs
resident here is the pager's bookkeeping and its grouped expert product,
not PCIe.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from wisp_jax import data
from wisp_jax.models.config import get_config
from wisp_jax.models.default import load_default
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.runs import timing
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


def _kwargs(model: MoEModel, run: dict, bank) -> dict[str, Any]:
  kwargs = {k: v for k, v in run.items() if k != "name"}
  if kwargs.get("hot_set") == "all":
    # Every expert resident from the start: the pager at a 100% hit rate.
    c = model.config
    kwargs["hot_set"] = np.tile(np.arange(c.num_experts, dtype=np.int32),
                                (c.num_layers, 1))
  if kwargs.get("experts") != "resident":
    kwargs["bank"] = bank
  return kwargs


def step_timer(model: MoEModel, prompts, kwargs: dict, short: int,
               long: int):
  """A function that measures one step time (s) of a source, compiled."""
  call = lambda n: generate(model, prompts, n, **kwargs)
  call(short), call(long)  # compile both cache lengths

  def measure() -> float:
    t0 = time.perf_counter()
    call(short)
    t1 = time.perf_counter()
    call(long)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (long - short)

  return measure


def _traffic(model, prompts, kwargs, long: int) -> dict[str, float]:
  stats = generate(model, prompts, long, **kwargs).stats
  decode = slice(1, None)  # pass 0 is the prefill
  hits = int(stats.per_pass_hits[decode].sum())
  misses = int(stats.per_pass_misses[decode].sum())
  loads = int(stats.per_pass_loads[decode].sum())
  return {"decode_hit_rate": hits / max(hits + misses, 1),
          "bytes_per_token": loads * stats.bytes_per_expert / (
              (long - 1) * len(prompts))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every configured source interleaved; writes summary.json."""
  workdir = common.start(workdir, config)
  model = _model(config)
  prompts = _prompts(config, model.config.vocab_size)
  bank = bank_lib.make_bank(model.experts.weights())
  sources = [dict(s) for s in config.sources]
  names = [s["name"] for s in sources]
  if len(set(names)) != len(names) or "resident" not in names:
    raise ValueError(f"sources need distinct names and one named "
                     f"'resident' (the baseline), got {names}.")
  logging.info("compiling %d sources x 2 cache lengths ...", len(sources))
  started = time.perf_counter()
  timers, traffic = {}, {}
  for source in sources:
    kwargs = _kwargs(model, source, bank)
    timers[source["name"]] = step_timer(model, prompts, kwargs,
                                        config.short_tokens,
                                        config.long_tokens)
    traffic[source["name"]] = _traffic(model, prompts, kwargs,
                                       config.long_tokens)
  logging.info("compiled in %.0f s; timing %d repeats", time.perf_counter()
               - started, config.repeats)
  metrics = common.metrics(workdir)
  result = timing.interleaved(
      timers, config.repeats, "resident",
      max_spread=config.get("max_spread", 2.0),
      on_measure=lambda m: metrics.write({"kind": "step_s", **m}))
  metrics.close()
  rows = []
  for source in sources:
    name = source["name"]
    step = result.times[name]
    rows.append({
        "name": name, "experts": source.get("experts"),
        "slots_per_layer": source.get("slots_per_layer"),
        "policy": source.get("policy"),
        "step_ms": {k: 1e3 * v for k, v in step.to_json().items()
                    if k != "values"},
        "step_ms_all": [1e3 * v for v in step.values],
        "tokens_per_s": (len(prompts) / step.median if step.median > 0
                         else None),
        "vs_resident": result.ratios[name].to_json(),
        "vs_resident_text": result.describe(name),
        "reliable": result.ok(name), "batch": len(prompts),
        **traffic[name]})
  summary = {"model": model.config.name, "dtype": config.dtype,
             "batch": len(prompts), "repeats": config.repeats,
             "results": rows, "table": table(rows)}
  common.finish(workdir, summary)
  plot(rows, workdir / PLOT, reports.title(
      f"decode, batch {len(prompts)}, {config.dtype}", model=model.config.name,
      hardware=reports.this_machine()))
  print(summary["table"])
  return summary


PLOT = "decode.png"


def plot(rows: list[dict[str, Any]], path, title: str) -> None:
  """Tokens/s per source (median bar, min-max whisker over the repeats)
  and expert bytes moved per token (log axis; resident moves none)."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = [r["name"] for r in rows]
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  medians, low, high = [], [], []
  for r in rows:
    times = np.array([t for t in r["step_ms_all"] if t > 0]) / 1e3
    tps = r["batch"] / times if times.size else np.array([np.nan])
    med = float(np.median(tps))
    medians.append(med)
    low.append(med - float(tps.min()))
    high.append(float(tps.max()) - med)
  axes[0].bar(x, medians, yerr=[low, high], capsize=3, color="C0",
              label="median over repeats (whisker: min-max)")
  axes[0].set(ylabel="decode tokens/s", ylim=(0, None))
  axes[0].legend(fontsize=7, loc="lower right")
  moved = [r["bytes_per_token"] for r in rows]
  axes[1].bar(x, [m if m > 0 else np.nan for m in moved], color="C1",
              label="expert bytes copied per token")
  for i, m in enumerate(moved):
    if m <= 0:
      axes[1].text(i, 0.02, "0", transform=axes[1].get_xaxis_transform(),
                   ha="center", va="bottom", fontsize=8)
  if any(m > 0 for m in moved):
    axes[1].set_yscale("log")
  axes[1].set(ylabel="bytes per token")
  axes[1].legend(fontsize=7, loc="upper right")
  for ax in axes:
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(rows: list[dict]) -> str:
  header = (f"{'source':<18}{'ms/step':>10}{'tok/s':>10}  "
            f"{'x resident (median [min, max])':<34}{'hit':>7}"
            f"{'bytes/token':>14}")
  lines = [header]
  for r in rows:
    tps = f"{r['tokens_per_s']:>10.1f}" if r["tokens_per_s"] else f"{'-':>10}"
    lines.append(f"{r['name']:<18}{r['step_ms']['median']:>10.3f}{tps}  "
                 f"{r['vs_resident_text']:<34}{r['decode_hit_rate']:>7.3f}"
                 f"{r['bytes_per_token']:>14.0f}")
  return "\n".join(lines)
