"""The workdir of an experiment run.

Every run writes the same layout:

  workdir/config.json     the resolved config
  workdir/summary.json    the run's results (what `run()` returns)
  workdir/metrics.jsonl   one JSON line per measurement or step, written as
                          it happens (an interrupted run keeps what it
                          measured so far)

so a notebook reads any run's results with `read_summary(workdir)`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

from wisp_jax.serving.stats import MetricsWriter

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


def write_json(path: str | pathlib.Path, obj: Any) -> None:
  """Writes `obj` as indented JSON (numpy scalars and arrays as numbers)."""
  pathlib.Path(path).write_text(
      json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
  if hasattr(value, "tolist"):
    return value.tolist()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def start(workdir: str | pathlib.Path,
          config: ml_collections.ConfigDict | dict) -> pathlib.Path:
  """Creates `workdir` and writes the resolved config; returns the path."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if hasattr(config, "to_json_best_effort"):
    (workdir / CONFIG_FILE).write_text(
        config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  else:
    write_json(workdir / CONFIG_FILE, dict(config))
  return workdir


def metrics_path(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir) / METRICS_FILE


def metrics(workdir: str | pathlib.Path) -> MetricsWriter:
  """A fresh `metrics.jsonl` in `workdir` (truncated), line-buffered."""
  path = pathlib.Path(workdir) / METRICS_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("")
  return MetricsWriter(workdir, METRICS_FILE)


def finish(workdir: str | pathlib.Path, summary: dict[str, Any]
           ) -> dict[str, Any]:
  """Writes `summary.json`; returns `summary`."""
  write_json(pathlib.Path(workdir) / SUMMARY_FILE, summary)
  return summary


def read_summary(workdir: str | pathlib.Path) -> dict[str, Any]:
  """The `summary.json` of a finished run."""
  return json.loads((pathlib.Path(workdir) / SUMMARY_FILE).read_text())


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Every line of a run's `metrics.jsonl`."""
  path = pathlib.Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line]
