"""Trains the byte-level default model: `run(config, workdir)`.

See configs/train_default.py. The training library (dense-dispatch forward,
losses, optimizer, evaluation) is `wisp_jax.models.training`.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from wisp_jax import data
from wisp_jax.models import checkpoint
from wisp_jax.models.training import (UNIFORM_BITS_PER_BYTE, evaluate,
                                      make_optimizer, make_train_step,
                                      model_config)
from wisp_jax.models.transformer import MoEModel
from wisp_jax.runs import common
from wisp_jax.runs import reports


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
        ) -> reports.Report:
  """Trains, checkpoints and evaluates; returns the summary.

  Writes to `workdir`: `config.json` (resolved config), `metrics.jsonl`
  (one JSON line per logged step), `checkpoint/` (see
  `wisp_jax.models.checkpoint`), `summary.json` and `loss.png`.

  Args:
    config: see `configs/train_default.py`.
    workdir: output directory (created).

  Returns:
    the contents of `summary.json` (prints as a one-line report).
  """
  reports.start_logging()
  mconfig = model_config(config)
  if config.seq_len > mconfig.max_seq_len:
    raise ValueError(f"seq_len={config.seq_len} exceeds the model's "
                     f"max_seq_len={mconfig.max_seq_len}.")
  if mconfig.vocab_size != 256:
    raise ValueError(f"the byte corpus needs vocab_size=256, got "
                     f"{mconfig.vocab_size} (preset {config.model.preset!r}).")
  workdir = common.start(workdir, config)

  corpus = data.load_corpus(config.val_fraction, config.max_train_bytes,
                            config.max_val_bytes)
  logging.info("corpus: %d train bytes (%d files), %d val bytes (%d files)",
               corpus.train.size, len(corpus.train_files),
               corpus.validation.size, len(corpus.validation_files))
  batches = data.batch_iterator(corpus.train, config.batch_size,
                                config.seq_len, config.seed)

  model = MoEModel(mconfig, rngs=nnx.Rngs(config.seed), dtype=jnp.float32)
  graphdef, params = nnx.split(model)
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  step_fn = make_train_step(graphdef, optimizer, config.aux_loss_weight)
  tokens_per_step = config.batch_size * config.seq_len

  with open(common.metrics_path(workdir), "w") as metrics_file:
    start = time.perf_counter()
    window_start, window_steps = start, 0
    for step in range(1, config.num_steps + 1):
      params, opt_state, metrics = step_fn(params, opt_state,
                                           jnp.asarray(next(batches)))
      window_steps += 1
      if step % config.log_every == 0 or step == config.num_steps:
        metrics = {k: float(v) for k, v in metrics.items()}  # syncs
        now = time.perf_counter()
        tokens_per_s = window_steps * tokens_per_step / (now - window_start)
        eta = (config.num_steps - step) * tokens_per_step / tokens_per_s
        record = {"step": step, "tokens_per_s": tokens_per_s,
                  "elapsed_s": now - start, **metrics}
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        logging.info("step %d/%d loss %.4f (%.3f bits/byte) aux %.3f "
                     "%.0f tokens/s ETA %.0f s", step, config.num_steps,
                     metrics["loss"], metrics["loss"] / math.log(2),
                     metrics["aux_loss"], tokens_per_s, eta)
        window_start, window_steps = now, 0
      if step == 1:  # the first step compiles; keep it out of later tokens/s
        jax.block_until_ready(params)
        logging.info("first step (compile) took %.1f s",
                     time.perf_counter() - start)
        window_start, window_steps = time.perf_counter(), 0
      if config.checkpoint_every and step % config.checkpoint_every == 0:
        nnx.update(model, params)
        checkpoint.save(model, workdir / f"checkpoint_{step}",
                        dtype=config.checkpoint_dtype)
  train_time = time.perf_counter() - start

  nnx.update(model, params)
  ckpt_dir = workdir / "checkpoint"
  checkpoint.save(model, ckpt_dir, dtype=config.checkpoint_dtype)
  # Evaluate exactly what was shipped (weights rounded to the saved dtype).
  shipped = checkpoint.restore(ckpt_dir, dtype=jnp.float32)
  windows = data.eval_windows(corpus.validation, config.seq_len,
                              config.eval_windows)
  results = evaluate(shipped, windows, config.eval_batch_size)
  summary = {
      "train_time_s": train_time,
      "steps": config.num_steps,
      "tokens_seen": config.num_steps * tokens_per_step,
      "train_loss_bits_per_byte": metrics["loss"] / math.log(2),
      "uniform_bits_per_byte": UNIFORM_BITS_PER_BYTE,
      "checkpoint_dtype": config.checkpoint_dtype,
      "model": mconfig.name,
      **results,
  }
  common.finish(workdir, summary)
  text = (f"trained {mconfig.name} for {config.num_steps} steps in "
          f"{train_time:.0f} s: val {results['val_bits_per_byte']:.3f} "
          "bits/byte (uniform 8), expert entropy per layer "
          f"{[round(h, 3) for h in results['expert_entropy_bits']]} bits "
          f"(max {results['max_entropy_bits']:.2f}); checkpoint "
          f"{ckpt_dir}")
  plot_loss(common.read_metrics(workdir), workdir / LOSS_PLOT,
            reports.title(f"training loss, batch {config.batch_size} x "
                          f"{config.seq_len} bytes", model=mconfig.name,
                          hardware=reports.this_machine(),
                          budget=f"{config.num_steps} steps, "
                          f"{summary['tokens_seen']:,} tokens"),
            results["val_bits_per_byte"])
  return reports.Report(summary, text)


LOSS_PLOT = "loss.png"


def plot_loss(records: list[dict[str, Any]], path: pathlib.Path, title: str,
              val_bits_per_byte: float | None = None) -> str:
  """Plots the training loss (bits per byte) per logged step, on a log y
  axis when it spans a decade; returns the y scale."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not records:
    raise ValueError(f"no logged steps to plot in {path.parent}/metrics.jsonl.")
  steps = [r["step"] for r in records]
  bits = [r["loss"] / math.log(2) for r in records]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, bits, marker="o", ms=3, label="training loss")
  if val_bits_per_byte is not None:
    ax.axhline(val_bits_per_byte, color="k", ls="--", lw=0.8,
               label=f"validation, final: {val_bits_per_byte:.3f}")
  ax.axhline(UNIFORM_BITS_PER_BYTE, color="r", ls=":", lw=0.8,
             label="uniform over 256 bytes (8 bits)")
  positive = [b for b in bits if b > 0]
  if positive and max(positive) / min(positive) >= 10:
    ax.set_yscale("log")
  ax.set(xlabel="step", ylabel="bits per byte")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return ax.get_yscale()
