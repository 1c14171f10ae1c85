"""The shared entry point of the experiment scripts.

Every script in `experiments/` is `launch.main(module.run)`: flags
`--config` (an ml_collections config file, fields overridable on the
command line) and `--workdir`, INFO logging, then `run(config, workdir)`,
the same function a notebook calls. A run that returns a
`wisp_jax.runs.reports.Report` has it printed at the end.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from wisp_jax.runs import reports


def main(run: Callable[[Any, str], Any],
         report: Callable[[Any, str], None] | None = None) -> None:
  """Parses `--config` and `--workdir` and calls `run(config, workdir)`.

  Args:
    run: the experiment, `run(config, workdir) -> summary`.
    report: optional `report(summary, workdir)` that shows the results
      (default: print the summary if it is a `reports.Report`).
  """
  config = config_flags.DEFINE_config_file("config", None, "Config file.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    summary = run(config.value, workdir.value)
    if report is not None:
      report(summary, workdir.value)
    elif isinstance(summary, reports.Report):
      print(summary)

  app.run(_main)
