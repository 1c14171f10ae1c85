"""Tests of wisp_jax/runs/timing.py on a fake, drifting clock."""

import pytest

from wisp_jax.runs import timing


class DriftingMachine:
  """Work of `cost` units takes cost x speed seconds; the machine slows
  down by 10% after every measurement (another job ramping up)."""

  def __init__(self):
    self.speed = 1.0

  def run(self, cost: float) -> float:
    seconds = cost * self.speed
    self.speed *= 1.1
    return seconds


def test_interleaving_recovers_the_ratio_the_window_method_misses():
  # B does 1.5x the work of A.
  machine = DriftingMachine()
  window = {name: [machine.run(cost) for _ in range(6)]
            for name, cost in (("a", 1.0), ("b", 1.5))}
  naive = sum(window["b"]) / sum(window["a"])
  # Each source in its own time window: b ran later, on a slower machine.
  assert naive > 2.5

  machine = DriftingMachine()
  result = timing.interleaved({"a": lambda: machine.run(1.0),
                               "b": lambda: machine.run(1.5)},
                              repeats=6, baseline="a")
  # Within each repeat b runs right after or before a: the ratio is 1.5
  # x 1.1^(+-1), half of each, and the median lands within 0.5% of 1.5.
  assert result.ratios["b"].median == pytest.approx(1.5, rel=5e-3)
  assert result.ratios["b"].low == pytest.approx(1.5 / 1.1)
  assert result.ratios["b"].high == pytest.approx(1.5 * 1.1)
  assert result.ok("b") and result.ratios["a"].median == 1.0
  assert result.describe("b").startswith("1.50")


def test_non_positive_and_noisy_results_are_refused():
  values = iter([1.0, -0.5, 1.0, 0.4])
  result = timing.interleaved({"a": lambda: 1.0, "b": lambda: next(values)},
                              repeats=2, baseline="a")
  assert not result.ok("b")
  assert result.describe("b").startswith("no figure (non-positive")
  noisy = iter([1.0, 5.0, 1.0, 1.0])
  result = timing.interleaved({"a": lambda: 1.0, "b": lambda: next(noisy)},
                              repeats=2, baseline="a", max_spread=2.0)
  assert "too noisy" in result.problems["b"]


def test_every_measurement_is_reported_as_it_happens():
  seen = []
  timing.interleaved({"a": lambda: 1.0, "b": lambda: 2.0, "c": lambda: 3.0},
                     repeats=3, baseline="a", on_measure=seen.append)
  assert [m["variant"] for m in seen] == ["a", "b", "c", "b", "c", "a",
                                          "c", "a", "b"]
  with pytest.raises(ValueError, match="baseline 'z'"):
    timing.interleaved({"a": lambda: 1.0}, 1, "z")
