"""Tests of wisp_jax/models/training.py and wisp_jax/data.py."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wisp_jax import data
from wisp_jax.models import checkpoint
from wisp_jax.models import training
from wisp_jax.runs import train
from wisp_jax.models.config import get_config
from wisp_jax.models.experts import ResidentSource
from wisp_jax.models.transformer import MoEModel

REPO = pathlib.Path(__file__).resolve().parents[2]


def _train_config(arg):
  spec = importlib.util.spec_from_file_location(
      "train_default", REPO / "configs" / "train_default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# A variant that exercises every optional block of the decoder.
_QWEN_LIKE = get_config("tiny").replace(
    shared_ffn=16, shared_expert_gate=True, norm_topk_prob=False,
    qk_norm="per_head", qkv_bias=True)


@pytest.mark.parametrize("config", [get_config("tiny"), get_config("default"),
                                   _QWEN_LIKE],
                         ids=["tiny", "default", "qwen_like"])
def test_dense_forward_matches_model_logits(config):
  model = MoEModel(config, rngs=nnx.Rngs(3))
  if config.qkv_bias:  # zero-initialised; make them matter
    attn = model.decoder.layers.attn  # stacked [L, ...]
    attn.q_bias[...] = 0.1 * jnp.ones_like(attn.q_bias[...])
  tokens = jax.random.randint(jax.random.key(0), (2, 37), 0,
                              config.vocab_size)
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state, tokens):
    model = nnx.merge(graphdef, state)
    experts = model.experts.weights()
    routed_ids = model.decoder.forward(tokens, None, None,
                                       ResidentSource(experts)).routing_ids
    return model(tokens), routed_ids, training.dense_forward(
        model.decoder, experts, tokens)

  expected, routed_ids, (logits, probs, ids) = both(state, tokens)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  # The ids are the inference routing.
  np.testing.assert_array_equal(ids, routed_ids.reshape(ids.shape))
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, atol=1e-6)


def test_load_balancing_loss_values():
  # 4 tokens, E=4, K=1: balanced routing with uniform probs gives 1.
  probs = jnp.full((1, 4, 4), 0.25)
  ids = jnp.arange(4).reshape(1, 4, 1)
  assert float(training.load_balancing_loss(probs, ids)) == pytest.approx(1.0)
  # All tokens to expert 0 with all probability on it gives E.
  probs = jnp.zeros((1, 4, 4)).at[:, :, 0].set(1.0)
  ids = jnp.zeros((1, 4, 1), jnp.int32)
  assert float(training.load_balancing_loss(probs, ids)) == pytest.approx(4.0)


def test_split_is_deterministic_and_disjoint():
  files = data.stdlib_files()
  assert files == sorted(files) and len(files) > 100
  train, val = data.split_files(files, 0.1)
  assert (train, val) == data.split_files(files, 0.1)
  train_rev, val_rev = data.split_files(files[::-1], 0.1)
  assert (set(train_rev), set(val_rev)) == (set(train), set(val))
  assert set(train).isdisjoint(val)
  assert sorted(train + val) == files
  assert 0.03 < len(val) / len(files) < 0.2
  # A file's split depends on its own path only, not on the other files.
  train_half, val_half = data.split_files(files[::2], 0.1)
  assert set(val_half) == set(val) & set(files[::2])
  assert set(train_half) == set(train) & set(files[::2])


def test_corpus_and_batches():
  corpus = data.load_corpus(max_train_bytes=50_000, max_val_bytes=20_000)
  assert corpus.train.dtype == np.uint8 and corpus.train.size == 50_000
  assert set(corpus.train_files).isdisjoint(corpus.validation_files)
  first = next(data.batch_iterator(corpus.train, 4, 16, seed=7))
  again = next(data.batch_iterator(corpus.train, 4, 16, seed=7))
  other = next(data.batch_iterator(corpus.train, 4, 16, seed=8))
  assert first.shape == (4, 17) and first.dtype == np.int32
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # Each row is a contiguous window of the corpus.
  text = corpus.train.tobytes()
  for row in first:
    assert bytes(row.astype(np.uint8).tolist()) in text
  windows = data.eval_windows(corpus.validation, 64)
  assert windows.shape == ((corpus.validation.size - 1) // 64, 65)
  np.testing.assert_array_equal(windows[1, 0], windows[0, 64])


def test_prompts_are_held_out_text():
  prompts = data.sample_prompts(3, max_bytes=120)
  assert prompts == data.sample_prompts(3, max_bytes=120)
  assert len(prompts) == 3
  for p in prompts:
    assert p.startswith("def ") and 60 <= len(p.encode()) <= 120
  assert data.decode(data.encode(prompts[0])) == prompts[0]


def test_run_tiny_trains_and_writes_outputs(tmp_path):
  config = _train_config("tiny")
  config.num_steps = 24
  config.log_every = 1
  config.eval_windows = 8
  summary = train.run(config, tmp_path)
  lines = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(1, 25))
  assert all(l["tokens_per_s"] > 0 for l in lines)
  # A few steps take the loss well below uniform (ln 256 = 5.5 nats).
  losses = [l["loss"] for l in lines]
  assert losses[0] > math.log(256) - 0.5
  assert np.mean(losses[-5:]) < losses[0] - 1.0
  assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 24
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  assert summary["tokens_seen"] == 24 * 8 * 32
  assert 0 < summary["val_bits_per_byte"] < 8.5
  entropy = summary["expert_entropy_bits"]
  assert len(entropy) == 2 and all(0 <= h <= math.log2(8) for h in entropy)
  counts = np.asarray(summary["expert_counts"])
  # Every held-out byte is routed to K=2 experts in each layer.
  assert (counts.sum(1) == 2 * summary["val_bytes"]).all()
  model = checkpoint.restore(tmp_path / "checkpoint")
  assert model.config == training.model_config(config)
