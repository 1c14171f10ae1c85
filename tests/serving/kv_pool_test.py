"""Tests of wisp_jax/serving/kv_pool.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wisp_jax.models.config import get_config
from wisp_jax.models.experts import ResidentSource
from wisp_jax.serving import blocks
from wisp_jax.serving import kv_pool
from wisp_jax.serving.kv_pool import KVPool, PagedKV

CONFIG = get_config("tiny")  # L=2, Hkv=1, Dh=10, max_seq_len=256


def test_sizes():
  assert blocks.blocks_for(0, 4) == 0
  assert blocks.blocks_for(8, 4) == 2
  assert blocks.blocks_for(9, 4) == 3
  assert blocks.max_blocks_per_request(CONFIG, 16) == 16
  # K and V x 2 layers x 4 positions x 1 head x 10 dims x 4 bytes.
  assert kv_pool.block_bytes(CONFIG, 4, jnp.float32) == 640
  np.testing.assert_array_equal(blocks.block_table([[4, 1], [2]], 3),
                                [[4, 1, 0], [2, 0, 0]])
  with pytest.raises(ValueError, match="room for 1"):
    blocks.block_table([[1, 2]], 1)


def _view(pool, table, length, num_new, write):
  return PagedKV(pool=pool, block_table=jnp.asarray(table, jnp.int32),
                 length=jnp.asarray(length, jnp.int32),
                 num_new=jnp.asarray(num_new, jnp.int32),
                 write=jnp.asarray(write))


def test_update_scatters_and_gathers_by_hand():
  # 6 blocks of 2 positions; row 0 holds blocks [4, 1], row 1 [0, 5];
  # row 2 is batch padding (write False).
  pool = KVPool.create(CONFIG, 6, 2, jnp.float32)
  table = [[4, 1], [0, 5], [4, 1]]
  # Row 0 already has 1 position and writes 2 new ones (positions 1, 2);
  # row 1 writes 1 real token (position 0) and 2 padding tokens.
  view = _view(pool, table, [1, 0, 1], [2, 1, 2], [True, True, False])
  # Padding tokens sit at their row's last real position.
  np.testing.assert_array_equal(view.positions(3),
                                [[1, 2, 2], [0, 0, 0], [1, 2, 2]])
  k = jnp.arange(1, 10, dtype=jnp.float32).reshape(3, 3, 1, 1) * jnp.ones(
      (1, 1, 1, 10))
  view, keys, values, mask = view.update(1, k, -k)
  got = np.asarray(view.pool.k[1, :, :, 0, 0])
  want = np.zeros((6, 2))
  want[4, 1] = 1  # row 0, position 1 -> block 4 offset 1
  want[1, 0] = 2  # row 0, position 2 -> block 1 offset 0
  want[0, 0] = 4  # row 1, position 0 -> block 0 offset 0
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(view.pool.v[1], -view.pool.k[1])
  assert not np.any(np.asarray(view.pool.k[0]))  # layer 0 untouched
  # Keys in position order through the table.
  np.testing.assert_array_equal(keys[0, :, 0, 0], [0, 1, 2, 0])
  np.testing.assert_array_equal(keys[1, :, 0, 0], [4, 0, 0, 0])
  np.testing.assert_array_equal(values[0, :, 0, 0], [0, -1, -2, 0])
  # Row 0: queries at 1, 2 see positions <= own (its padding query sees
  # what position 2 sees); row 1's queries see only position 0.
  np.testing.assert_array_equal(mask[0], [[1, 1, 0, 0], [1, 1, 1, 0],
                                          [1, 1, 1, 0]])
  np.testing.assert_array_equal(mask[1], [[1, 0, 0, 0]] * 3)
  np.testing.assert_array_equal(mask[2], mask[0])
  advanced = view.advance(3)
  np.testing.assert_array_equal(advanced.length, [3, 1, 3])
  np.testing.assert_array_equal(advanced.num_new, [0, 0, 0])


def test_forward_matches_full_sequence(tiny_model):
  """Rows of different lengths prefilled together, then one decode step,
  give the logits of the plain full-sequence forward."""
  model = tiny_model
  source = ResidentSource(model.experts.weights())
  rng = np.random.default_rng(1)
  lengths = [7, 3]
  # Each row's prompt and its next token, right-padded to 8.
  full_tokens = np.zeros((2, 8), np.int32)
  for i, n in enumerate(lengths):
    full_tokens[i, :n + 1] = rng.integers(0, CONFIG.vocab_size, size=n + 1)
  pool = KVPool.create(CONFIG, 8, 4, jnp.float32)
  table = blocks.block_table([[5, 2], [7, 0]], 3)
  prompts = np.where(np.arange(8) < np.array(lengths)[:, None], full_tokens, 0)

  @jax.jit
  def forward(tokens, view):
    out = model.decoder.forward(tokens, None, view, source)
    return out.logits, out.kv.advance(tokens.shape[1])

  logits, view = forward(jnp.asarray(prompts),
                         _view(pool, table, [0, 0], lengths, [True, True]))
  np.testing.assert_array_equal(view.length, lengths)
  step_tokens = full_tokens[np.arange(2), lengths][:, None]
  view = view.replace(num_new=jnp.ones((2,), jnp.int32))
  step_logits, _ = forward(jnp.asarray(step_tokens), view)
  full = jax.jit(model)(jnp.asarray(full_tokens))
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, :n], full[i, :n], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(step_logits[i, 0], full[i, n], rtol=1e-5,
                               atol=1e-5)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_stale_non_finite_blocks_do_not_leak(tiny_model):
  """Positions no query sees (stale blocks, table padding) may hold NaN or
  inf: the logits are those of a zeroed pool, bit for bit."""
  model = tiny_model
  source = ResidentSource(model.experts.weights())
  tokens = jnp.asarray(np.random.default_rng(2).integers(
      0, CONFIG.vocab_size, size=(2, 4)), jnp.int32)
  # Row 0 holds blocks [3, 1] and row 1 [2]; the table pads with block 0.
  table = blocks.block_table([[3, 1], [2]], 3)

  @jax.jit
  def forward(pool):
    view = _view(pool, table, [0, 0], [4, 3], [True, True])
    return model.decoder.forward(tokens, None, view, source).logits

  clean = KVPool.create(CONFIG, 4, 4, jnp.float32)
  stale = jnp.full_like(clean.k, jnp.nan).at[:, 0].set(jnp.inf)
  logits = forward(KVPool(k=stale, v=stale))
  assert np.all(np.isfinite(np.asarray(logits)))
  assert np.array_equal(logits, forward(clean))


def test_zero_blocks():
  pool = KVPool.create(CONFIG, 4, 2, jnp.float32)
  pool = KVPool(k=pool.k + 1, v=pool.v - 1)
  out = kv_pool.zero_blocks(pool, jnp.asarray([2, 0, 4, 4], jnp.int32))
  for got, fill in ((out.k, 1), (out.v, -1)):
    got = np.asarray(got)
    assert not np.any(got[:, [0, 2]])  # every layer; 4 (= NB) is padding
    assert np.all(got[:, [1, 3]] == fill)
