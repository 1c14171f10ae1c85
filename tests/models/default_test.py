"""Tests of wisp_jax/models/default.py and the shipped checkpoint."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from wisp_jax import data
from wisp_jax.models import checkpoint
from wisp_jax.models import default
from wisp_jax.models.config import get_config
from wisp_jax.serving.generate import generate


def _jitted(model):
  """`model(tokens)`, compiled."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  return lambda tokens: forward(state, tokens)


@pytest.fixture(scope="module")
def model():
  return default.load_default()


def test_loads_with_the_default_config(model):
  assert model.config == get_config("default")
  assert model.dtype == jnp.float32
  assert checkpoint.load_config(default.DEFAULT_CHECKPOINT) == model.config
  # Shipped small: a few MB of bfloat16.
  assert checkpoint.num_bytes(default.DEFAULT_CHECKPOINT) < 8 * 2**20


def test_experts_load_into_pinned_host():
  host = default.load_default(jnp.bfloat16, expert_memory_kind="pinned_host")
  assert host.experts.gate[...].sharding.memory_kind == "pinned_host"
  assert host.experts.gate[...].dtype == jnp.bfloat16


def test_shipped_summary_beats_uniform():
  summary = default.default_summary()
  assert summary["val_bits_per_byte"] < 4.0
  assert summary["uniform_bits_per_byte"] == 8.0
  entropy = summary["expert_entropy_bits"]
  assert len(entropy) == get_config("default").num_layers
  # Every layer uses more than its top-2 experts.
  assert all(1.0 < h <= math.log2(8) + 1e-9 for h in entropy)


def test_model_predicts_held_out_text(model):
  # One held-out window: the shipped model must be far better than uniform.
  corpus = data.load_corpus(max_train_bytes=1, max_val_bytes=20_000)
  windows = data.eval_windows(corpus.validation, 256, max_windows=2)
  logits = _jitted(model)(jnp.asarray(windows[:, :-1]))
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.asarray(windows[:, 1:]))
  assert float(jnp.mean(nll)) / math.log(2) < 4.0


def test_greedy_generation_is_deterministic(model):
  prompt = data.encode(data.sample_prompts(1)[0])
  first = generate(model, [prompt], 24, temperature=0.0, return_logits=True)
  second = generate(model, [prompt], 24, temperature=0.0)
  assert first.tokens.shape == (1, 24)
  np.testing.assert_array_equal(first.tokens, second.tokens)
  # Greedy: every byte is the argmax of the logits it was drawn from.
  np.testing.assert_array_equal(first.tokens[0],
                                np.argmax(first.logits[0], axis=-1))
  # A trained model continues code with more than one repeated byte.
  assert len(set(first.tokens[0].tolist())) > 3


def test_missing_checkpoint_explains_how_to_train(monkeypatch, tmp_path):
  monkeypatch.setattr(default, "DEFAULT_CHECKPOINT", tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="experiments/train.py"):
    default.load_default()
