"""Records the shipped default model's routing: `run(config, workdir)`.

See configs/record.py. Writes `workdir/trace.npz` (a `RoutingTrace`),
`config.json` and `summary.json`.
"""

from __future__ import annotations

import pathlib
import time
from typing import Any

import ml_collections

from wisp_jax.runs import common
from wisp_jax.serving import record as record_lib

TRACE_FILE = "trace.npz"


def run(config: ml_collections.ConfigDict,
        workdir: str | pathlib.Path) -> dict[str, Any]:
  """Records the default model (configs/record.py); returns the summary.

  Writes `workdir/trace.npz` (a `RoutingTrace`), `config.json` and
  `summary.json`.
  """
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
  return common.finish(workdir, summary)
