"""Tests of wisp_jax/models/transformer.py: stacked layers, the looped layer
body and its unrolled debugging twin."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.models.config import get_config
from wisp_jax.models.experts import ResidentSource
from wisp_jax.models.transformer import MoEModel
from wisp_jax.paging import bank as bank_lib
from wisp_jax.serving.generate import generate

CONFIG = get_config("tiny")
PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]


def test_layer_parameters_are_stacked():
  model = MoEModel(CONFIG.replace(num_layers=3), rngs=nnx.Rngs(0))
  layers = model.decoder.layers
  assert layers.attn.q_proj[...].shape == (3, CONFIG.d_model,
                                           CONFIG.num_heads * CONFIG.head_dim)
  assert layers.router[...].shape == (3, CONFIG.d_model, CONFIG.num_experts)
  # Each layer drew its own weights.
  assert not np.array_equal(layers.router[...][0], layers.router[...][1])


def test_forward_output_fields():
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray([[1, 2, 3], [4, 5, 6]])
  out = jax.jit(lambda t: model.decoder.forward(
      t, None, None, ResidentSource(model.experts.weights()),
      router_probs=True))(tokens)
  assert out.logits.shape == (2, 3, CONFIG.vocab_size)
  assert out.routing_ids.shape == (CONFIG.num_layers, 2, 3, CONFIG.top_k)
  assert out.routing_weights.shape == out.routing_ids.shape
  probs = np.asarray(out.router_probs)
  assert probs.shape == (CONFIG.num_layers, 6, CONFIG.num_experts)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  # The routed ids are the top-k of the probabilities, per layer.
  top = np.argsort(-probs, axis=-1, kind="stable")[..., :CONFIG.top_k]
  assert np.array_equal(np.sort(top, -1), np.sort(np.asarray(
      out.routing_ids).reshape(CONFIG.num_layers, 6, -1), -1))


def test_unrolled_layers_match_the_loop_and_stay_exact():
  looped = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  unrolled = MoEModel(CONFIG.replace(unroll_layers=True), rngs=nnx.Rngs(0))
  ref = generate(looped, PROMPTS, 16, return_logits=True)
  debug = generate(unrolled, PROMPTS, 16, return_logits=True)
  # Another program: the same function up to float rounding.
  np.testing.assert_allclose(debug.logits, ref.logits, rtol=1e-5, atol=1e-5)
  bank = bank_lib.make_bank(unrolled.experts.weights())
  paged = generate(unrolled, PROMPTS, 16, experts="paged", slots_per_layer=2,
                   bank=bank, return_logits=True)
  assert np.array_equal(paged.logits, debug.logits)
  assert paged.stats.misses.sum() > 0


def test_model_call_is_jitted_and_matches_generate_prefill():
  model = MoEModel(CONFIG, rngs=nnx.Rngs(0))
  tokens = np.array([[1, 2, 3, 4, 5]])
  a, b = np.asarray(model(tokens)), np.asarray(model(tokens))
  assert np.array_equal(a, b)
  out = generate(model, [tokens[0]], 1, return_logits=True)
  np.testing.assert_allclose(out.logits[0, 0], a[0, -1], rtol=1e-5, atol=1e-5)
