"""Timing on a shared, noisy machine: variants interleaved inside each repeat.

A figure measured in its own time window mostly measures the window (load
from other jobs comes and goes). `interleaved` runs every variant once per
repeat, in an order that rotates from repeat to repeat (ABC, BCA, CAB, ...),
and compares variants only within a repeat: the ratio of each variant to
the baseline is taken per repeat, then summarised by its median and spread.
A result whose values are not positive, or whose ratios spread more than
`max_spread` (max / min), is marked unreliable with the reason, instead of
printed as a figure.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spread:
  """Median and spread of repeated values.

  Attributes:
    median: the median.
    low: the minimum.
    high: the maximum.
    q1: the first quartile.
    q3: the third quartile.
    values: every value, in repeat order.
  """
  median: float
  low: float
  high: float
  q1: float
  q3: float
  values: tuple[float, ...]

  @classmethod
  def of(cls, values) -> "Spread":
    v = np.asarray(list(values), np.float64)
    return cls(median=float(statistics.median(v.tolist())),
               low=float(v.min()), high=float(v.max()),
               q1=float(np.percentile(v, 25)), q3=float(np.percentile(v, 75)),
               values=tuple(v.tolist()))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Interleaved measurements of several variants against a baseline.

  Attributes:
    baseline: the variant ratios are taken against.
    times: per variant, the spread of its measured values.
    ratios: per variant, the spread of value / baseline value, taken within
      each repeat.
    problems: per variant, why its ratio is not a result ("" if it is).
  """
  baseline: str
  times: Mapping[str, Spread]
  ratios: Mapping[str, Spread]
  problems: Mapping[str, str]

  def ok(self, name: str) -> bool:
    return not self.problems[name]

  def describe(self, name: str) -> str:
    """"1.16x [1.12, 1.21]" or why there is no figure."""
    if self.problems[name]:
      return f"no figure ({self.problems[name]})"
    r = self.ratios[name]
    return f"{r.median:.3f}x [{r.low:.3f}, {r.high:.3f}]"

  def to_json(self) -> dict:
    return {"baseline": self.baseline,
            "times": {k: v.to_json() for k, v in self.times.items()},
            "ratios": {k: v.to_json() for k, v in self.ratios.items()},
            "problems": dict(self.problems)}


def interleaved(variants: Mapping[str, Callable[[], float]], repeats: int,
                baseline: str, max_spread: float = 2.0,
                on_measure: Callable[[dict], None] | None = None
                ) -> Comparison:
  """Measures every variant once per repeat, in a rotating order.

  Args:
    variants: name -> a function that performs one measurement and returns
      its value (e.g. seconds per step).
    repeats: rounds (each measures every variant once).
    baseline: the variant the ratios divide by.
    max_spread: a ratio whose max / min over repeats exceeds this is
      unreliable.
    on_measure: called with `{"repeat", "variant", "value"}` after each
      measurement (write it to metrics.jsonl: an interrupted run keeps what
      it measured).

  Returns:
    the comparison.
  """
  names = list(variants)
  if baseline not in variants:
    raise ValueError(f"baseline {baseline!r} is not one of {names}.")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  values = {name: [] for name in names}
  for repeat in range(repeats):
    shift = repeat % len(names)
    for name in names[shift:] + names[:shift]:
      value = float(variants[name]())
      values[name].append(value)
      if on_measure is not None:
        on_measure({"repeat": repeat, "variant": name, "value": value})
  base = np.asarray(values[baseline])
  times, ratios, problems = {}, {}, {}
  for name in names:
    v = np.asarray(values[name])
    times[name] = Spread.of(v)
    problem = ""
    if np.any(v <= 0) or np.any(base <= 0):
      problem = "non-positive measurements"
      ratio = np.full_like(v, np.nan)
    else:
      ratio = v / base
      if ratio.max() / ratio.min() > max_spread:
        problem = (f"ratios spread {ratio.min():.3g}..{ratio.max():.3g}, "
                   f"more than {max_spread:g}x: the machine was too noisy")
    ratios[name] = Spread.of(ratio)
    problems[name] = problem
  return Comparison(baseline=baseline, times=times, ratios=ratios,
                    problems=problems)
