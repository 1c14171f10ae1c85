"""Runs the serving engine on a workload: `run(config, workdir)`.

See configs/serve.py for the fields. Writes to `workdir`: `config.json`
(resolved config), `metrics.jsonl` (one line per engine step),
`requests.jsonl` (one line per request) and `summary.json` (throughput,
TTFT and latency percentiles, pager hit rate and bytes, KV peak,
preemptions) and `serve_steps.png` (batch, KV blocks in use and hit rate
over engine steps). `engine.split_file` names a `split.json` from
`experiments/allocate.py` whose slots per layer and KV blocks replace
`engine.slots_per_layer` and `engine.kv_blocks`.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.models import config as config_lib
from wisp_jax.models import default
from wisp_jax.models.transformer import MoEModel
from wisp_jax.serving import scheduler
from wisp_jax.serving import request_stream
from wisp_jax.serving.budget import DeviceBudget
from wisp_jax.serving.engine import Engine, Request
from wisp_jax.serving.stats import summarize_requests

MIB = 2**20


def load_model(config: ml_collections.ConfigDict) -> tuple[MoEModel, str]:
  """The model named by `config.model`; returns it and where it came from.

  `shipped`: the trained default checkpoint (`wisp_jax.models.default`);
  `auto`: that checkpoint if present, else the `default` preset with random
  weights; any other name: that preset (with `config.model_overrides`)
  with random weights from `config.seed`.
  """
  dtype = jnp.dtype(config.dtype)
  name = config.model
  if name in ("auto", "shipped"):
    try:
      return default.load_default(dtype=dtype), "shipped checkpoint"
    except FileNotFoundError as e:
      if name == "shipped":
        raise
      logging.warning("no shipped model (%s); using the 'default' preset "
                      "with random weights.", e)
      name = "default"
  model_config = config_lib.get_config(name)
  overrides = dict(config.model_overrides)
  if overrides:
    model_config = model_config.replace(**overrides)
  model = MoEModel(model_config, rngs=nnx.Rngs(config.seed), dtype=dtype)
  return model, f"preset {name!r}, random weights (seed {config.seed})"


def make_requests(config: ml_collections.ConfigDict,
                  vocab_size: int) -> list[Request]:
  """The workload: a JSON-lines file, or stdlib-text requests."""
  w = config.workload
  if w.file:
    return request_stream.load_jsonl(w.file, vocab_size)
  return request_stream.synthetic_workload(
      w.num_requests, (w.prompt_len_min, w.prompt_len_max),
      (w.max_new_tokens_min, w.max_new_tokens_max), w.arrival, w.rate,
      vocab_size, w.temperature, w.seed)


def read_split_file(path: str, num_layers: int) -> tuple[tuple[int, ...], int]:
  """Slots per layer and KV blocks of a `split.json` (experiments/allocate.py).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file lacks a field, or splits another number of layers.
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"engine.split_file={path!r} does not exist; "
                            "experiments/allocate.py writes "
                            "workdir/split.json.")
  split = json.loads(file.read_text())
  missing = [k for k in ("slots_per_layer", "kv_blocks") if k not in split]
  if missing:
    raise ValueError(f"{path}: missing {missing}; a split.json holds "
                     "slots_per_layer and kv_blocks.")
  slots = tuple(int(v) for v in split["slots_per_layer"])
  if len(slots) != num_layers:
    raise ValueError(f"{path} splits {len(slots)} layers, but the model has "
                     f"{num_layers}; allocate for this model (config.model "
                     "of experiments/allocate.py).")
  return slots, int(split["kv_blocks"])


def _engine(model: MoEModel, config: ml_collections.ConfigDict,
            workdir: str | None) -> Engine:
  e, b = config.engine, config.budget
  budget = None
  if b.total_mib > 0:
    budget = DeviceBudget(int(b.total_mib * MIB),
                          int(b.workspace_mib * MIB)).for_model(
                              model, e.block_size)
  slots, kv_blocks = e.slots_per_layer, e.kv_blocks
  if e.get("split_file"):
    slots, kv_blocks = read_split_file(e.split_file, model.config.num_layers)
  if kv_blocks <= 0:
    if budget is None:
      raise ValueError("engine.kv_blocks <= 0 means 'what the budget "
                       "leaves', but budget.total_mib is 0 (no budget).")
    kv_blocks = budget.max_kv_blocks(
        slots if e.experts == "paged" else model.config.num_experts)
  return Engine(model, budget, slots, kv_blocks, e.block_size,
                e.max_batch, experts=e.experts, policy=e.policy,
                min_prefill_bucket=e.min_prefill_bucket, workdir=workdir)


def _warmup(model: MoEModel, config: ml_collections.ConfigDict,
            requests: list[Request]) -> float:
  """Compiles the steps the workload will use on a throwaway engine (same
  shapes, so the compiled steps are shared); returns the seconds taken."""
  started = time.perf_counter()
  engine = _engine(model, config, None)
  max_len = model.config.max_seq_len
  lengths = {scheduler.bucket_for(min(len(r.prompt), max_len - 1),
                                   engine.prefill_buckets) for r in requests}
  # One request per prefill bucket; then a batch that drains one row per
  # step, which visits every decode bucket.
  warm = [Request([0] * min(b, max_len - 1), 1) for b in sorted(lengths)]
  warm += [Request([0], i + 2) for i in range(engine.max_batch)]
  engine.run(warm)
  return time.perf_counter() - started


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Serves the configured workload; returns the contents of summary.json
  (prints as a one-paragraph report) and writes serve_steps.png."""
  reports.start_logging()
  workdir = common.start(workdir, config)
  model, origin = load_model(config)
  c = model.config
  logging.info("model %s (%s): L=%d E=%d K=%d D=%d, max_seq_len=%d", c.name,
               origin, c.num_layers, c.num_experts, c.top_k, c.d_model,
               c.max_seq_len)
  requests = make_requests(config, c.vocab_size)
  warmup_s = _warmup(model, config, requests) if config.warmup else 0.0
  metrics_file = common.metrics_path(workdir)
  metrics_file.unlink(missing_ok=True)
  engine = _engine(model, config, str(workdir))
  logging.info("engine: %s slots/layer, %d KV blocks of %d, max batch %d, "
               "budget %s; %d requests; warm-up %.1f s",
               list(engine.split.slots_per_layer), engine.allocator.num_blocks,
               engine.block_size, engine.max_batch, engine.budget_usage,
               len(requests), warmup_s)

  def progress(record):
    if record.step % config.log_every == 0:
      done = sum(r.finish_reason is not None for r in engine.results.values())
      pager = engine.expert_stats()
      logging.info(
          "step %d: batch %d, queue %d, done %d/%d, KV %d/%d (peak %d), "
          "preemptions %d, hit rate %.3f", record.step,
          record.batch_size, record.queue_length, done, len(requests),
          record.kv_blocks_in_use, engine.allocator.num_blocks,
          record.kv_blocks_peak, record.preemptions_total,
          pager["hit_rate"])

  started = time.perf_counter()
  results = engine.run(requests, on_step=progress)
  wall_s = time.perf_counter() - started
  engine.close()

  with open(workdir / "requests.jsonl", "w") as f:
    for result in results:
      f.write(json.dumps(result.to_json()) + "\n")
  summary = {"model": c.name, "model_origin": origin,
             **summarize_requests(results, wall_s),
             "engine": engine.summary(), "warmup_s": warmup_s}
  common.finish(workdir, summary)
  pager = summary["engine"]["pager"]
  text = (
      f"served {summary['completed']}/{len(requests)} requests "
      f"({summary['failed']} failed) in {wall_s:.2f} s: "
      f"{summary['throughput_tokens_per_s'] or 0.0:.1f} tokens/s, TTFT p50 "
      f"{_fmt(summary['ttft_s']['p50'])} s, latency p90 "
      f"{_fmt(summary['latency_s']['p90'])} s, hit rate "
      f"{pager['hit_rate']:.3f}, {reports.format_bytes(pager['bytes_moved'])}"
      f" of experts moved, KV peak {summary['engine']['kv_blocks_peak']}/"
      f"{engine.allocator.num_blocks} blocks, "
      f"{summary['engine']['preemptions']} preemptions")
  budget = (f"{config.budget.total_mib:g} MiB" if config.budget.total_mib > 0
            else f"{engine.allocator.num_blocks} KV blocks")
  plot_steps(common.read_metrics(workdir), workdir / STEPS_PLOT,
             reports.title(f"serving: {len(requests)} requests, "
                           f"{config.engine.experts} experts",
                           model=c.name, hardware=reports.this_machine(),
                           budget=budget))
  return reports.Report(summary, text)


STEPS_PLOT = "serve_steps.png"


def plot_steps(records: list[dict[str, Any]], path: pathlib.Path,
               title: str) -> None:
  """Batch size, KV blocks in use and pager hit rate over engine steps."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = [r["step"] for r in records]
  fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
  axes[0].step(steps, [r["batch_size"] for r in records], where="post",
               label="decode batch")
  axes[0].step(steps, [r["queue_length"] for r in records], where="post",
               ls="--", label="queue")
  axes[0].set_ylabel("requests")
  axes[0].set_ylim(bottom=0)
  axes[1].step(steps, [r["kv_blocks_in_use"] for r in records],
               where="post", label="in use")
  axes[1].step(steps, [r["kv_blocks"] for r in records], where="post",
               color="0.5", ls=":", label="pool")
  axes[1].set_ylabel("KV blocks")
  axes[1].set_ylim(bottom=0)
  hits = np.cumsum([r["pager_hits"] for r in records])
  needed = hits + np.cumsum([r["pager_misses"] for r in records])
  step_needed = [r["pager_hits"] + r["pager_misses"] for r in records]
  axes[2].plot(steps, [r["pager_hits"] / n if n else np.nan
                       for r, n in zip(records, step_needed)], ".",
               ms=3, alpha=0.5, label="this step")
  axes[2].plot(steps, np.where(needed > 0, hits / np.maximum(needed, 1),
                               np.nan), label="cumulative")
  axes[2].set_ylabel("expert hit rate")
  axes[2].set_ylim(0, 1.02)
  axes[2].set_xlabel("engine step")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
  axes[0].set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"
