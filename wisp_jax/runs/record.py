"""Records the shipped default model's routing: `run(config, workdir)`.

See configs/record.py. Writes `workdir/trace.npz` (a `RoutingTrace`),
`config.json` and `summary.json`.
"""

from __future__ import annotations

import pathlib
import time

import ml_collections

from wisp_jax.runs import common
from wisp_jax.runs import reports
from wisp_jax.serving import record as record_lib

TRACE_FILE = "trace.npz"


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> reports.Report:
  """Records the default model (configs/record.py); returns the summary.

  Writes `workdir/trace.npz` (a `RoutingTrace`), `config.json` and
  `summary.json`. The summary prints as a one-line report.
  """
  reports.start_logging()
  workdir = common.start(workdir, config)
  if config.model != "default":
    raise ValueError(f"config.model={config.model!r}: only the shipped "
                     "'default' model can be recorded here; record another "
                     "model with wisp_jax.serving.record.record(model, ...).")
  start = time.perf_counter()
  trace = record_lib.record_default(
      config.num_prompts, config.max_prompt_bytes, config.max_new_tokens,
      config.batch_size, config.equal_length)
  path = workdir / TRACE_FILE
  trace.save(path)
  summary = {"trace_path": str(path), "seconds": time.perf_counter() - start,
             **record_lib.summarize(trace)}
  common.finish(workdir, summary)
  text = (f"recorded {summary['num_events']} events ({summary['num_steps']} "
          f"steps, {summary['num_requests']} requests) in "
          f"{summary['seconds']:.1f} s -> {summary['trace_path']}")
  return reports.Report(summary, text)
