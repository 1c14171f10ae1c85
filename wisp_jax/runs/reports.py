"""What a run shows a person: printable reports, labels, plot titles.

`run(config, workdir)` returns a `Report`: the summary dict (exactly what
`summary.json` holds) that prints as the run's text report, so a notebook
cell ending in `wisp_jax.runs.serve.run(config, workdir)` shows the table,
and `print(report)` does anywhere. `start_logging()` makes the runs' INFO
lines visible outside `absl.app.run` (a notebook, a plain script).
"""

from __future__ import annotations

import os
import platform
from typing import Any, Sequence

import jax
from absl import flags
from absl import logging


class Report(dict):
  """A run's summary that prints as its report.

  It is the summary dict itself (compare it, index it, `json.dumps` it);
  `str(report)` and a notebook's display show `report.text`.
  """

  def __init__(self, summary: dict[str, Any], text: str):
    super().__init__(summary)
    self.text = text

  def __str__(self) -> str:
    return self.text

  def _repr_pretty_(self, printer, cycle) -> None:  # IPython display
    del cycle
    printer.text(self.text)


def start_logging() -> None:
  """INFO logging when no `absl.app.run` parsed the flags (a notebook)."""
  if not flags.FLAGS.is_parsed() and logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)


def split_names(value) -> tuple[str, ...]:
  """Names from a tuple/list or a comma-separated string."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)


def format_bytes(n: float) -> str:
  """`n` bytes in the largest binary unit that keeps it >= 1: 36.6 KiB."""
  n = float(n)
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.0f} B"


def byte_unit(values: Sequence[float]) -> tuple[str, float]:
  """One unit (name, bytes) for an axis of byte values: the largest that
  keeps the biggest value >= 1."""
  top = max((abs(float(v)) for v in values), default=0.0)
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if top >= scale:
      return unit, float(scale)
  return "B", 1.0


def machine() -> dict[str, Any]:
  """The machine a measurement ran on."""
  return {"backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "cpu_count": os.cpu_count(),
          "processor": platform.processor() or platform.machine(),
          "load_average": list(os.getloadavg())}


def this_machine() -> str:
  """A short name of the machine for plot titles, e.g. "CPU (2 cores)"."""
  backend = jax.default_backend()
  if backend == "cpu":
    return f"{platform.machine()} CPU ({os.cpu_count()} cores)"
  return f"{jax.devices()[0].device_kind}"


def title(what: str, *, model: str, hardware: str,
          budget: str | None = None) -> str:
  """A plot title naming the model, the hardware and the budget."""
  parts = [f"model {model}", hardware]
  if budget:
    parts.append(f"budget {budget}")
  return f"{what}\n" + ", ".join(parts)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A fixed-width table: first column left-aligned, the others right."""
  cells = [[str(h) for h in header]] + [[_cell(v) for v in row]
                                        for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for r in cells:
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))))
  return "\n".join(lines)


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
  return str(value)


def strip_plot(groups: dict[str, Sequence[float]], path, *, ylabel: str,
               title: str, lines: Sequence[tuple[float, str, str, str]] = (),
               ylim: tuple[float, float] | None = None) -> None:
  """One column of jittered points per group (a cell each), with
  horizontal reference `lines` (value, color, line style, label), saved to
  `path`."""
  import matplotlib  # Loaded only to plot.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups)), 3.6))
  rng = np.random.default_rng(0)
  for i, values in enumerate(groups.values()):
    ax.plot(i + rng.uniform(-0.2, 0.2, len(values)), list(values), ".",
            ms=4, color="C0", label="one cell" if i == 0 else None)
  for value, color, style, label in lines:
    ax.axhline(value, color=color, ls=style, lw=1, label=label)
  ax.set(ylabel=ylabel)
  if ylim:
    ax.set(ylim=ylim)
  ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
