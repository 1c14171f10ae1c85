"""Fixtures shared by the serving tests."""

import pytest
from flax import nnx

from wisp_jax.models.config import get_config
from wisp_jax.models.transformer import MoEModel


@pytest.fixture(scope="session")
def tiny_model() -> MoEModel:
  """The `tiny` preset with float32 random weights (seed 0)."""
  return MoEModel(get_config("tiny"), rngs=nnx.Rngs(0))
