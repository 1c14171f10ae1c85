"""Tests of wisp_jax/runs/train.py's loss plot (the run itself:
tests/models/training_test.py)."""

import math

import pytest

from wisp_jax.runs import train


def _records(bits):
  return [{"step": i + 1, "loss": b * math.log(2)} for i, b in enumerate(bits)]


def test_loss_plot_is_linear_unless_it_spans_a_decade(tmp_path):
  path = tmp_path / "loss.png"
  assert train.plot_loss(_records([8.5, 7.0, 6.1]), path, "t", 6.0) == "linear"
  assert path.read_bytes()[:4] == b"\x89PNG"
  assert train.plot_loss(_records([8.0, 2.0, 0.5]), path, "t") == "log"
  with pytest.raises(ValueError, match="no logged steps"):
    train.plot_loss([], path, "t")
