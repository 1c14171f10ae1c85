"""Tests for wisp_jax/compress/codec.py: exact round trips, shapes, bytes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from wisp_jax.compress import codec

# bf16 bit patterns that are easy to get wrong.
SPECIALS = np.array([
    0x0000, 0x8000,  # +0, -0
    0x7F80, 0xFF80,  # +inf, -inf
    0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7FFF,  # NaNs: quiet, signalling, payloads
    0x0001, 0x007F, 0x8001, 0x807F,  # smallest / largest subnormals
    0x0080, 0x7F7F, 0xFF7F,  # smallest normal, largest finite
    0x3F80, 0xBF80,  # +-1
], np.uint16)


def gaussian_bits(shape, seed=0, scale=None) -> np.ndarray:
  rng = np.random.default_rng(seed)
  scale = scale if scale is not None else shape[-1] ** -0.5
  w = (scale * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16)
  return w.view(np.uint16)


def round_trip(bits, **kw) -> codec.Compressed:
  c = codec.encode(bits, **kw)
  out = np.asarray(jax.jit(codec.decode)(jax.device_put(c)))
  assert out.dtype == np.uint16 and out.shape == bits.shape
  assert np.array_equal(out, bits)
  return c


@pytest.mark.parametrize("code_bits", [None, 0, 1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (7,), (31,), (33,), (3, 5, 37),
                                   (128, 96)])
def test_round_trip_gaussian_every_width(shape, code_bits):
  c = round_trip(gaussian_bits(shape), code_bits=code_bits)
  if code_bits is not None:
    assert c.code_bits == code_bits


@pytest.mark.parametrize("code_bits", [None, 0, 1, 3, 4, 6, 7, 8])
def test_round_trip_every_bit_pattern(code_bits):
  # All 65536 patterns: all 256 exponents, every NaN, inf, subnormal, -0.
  bits = np.random.default_rng(0).permutation(
      np.arange(2**16, dtype=np.uint32)).astype(np.uint16).reshape(256, 256)
  c = round_trip(bits, code_bits=code_bits)
  if code_bits is None:
    # Uniform exponents do not compress: stored raw, one table byte over.
    assert c.is_raw
    assert codec.compressed_bytes(c) == codec.raw_bytes(c) + 1


@pytest.mark.parametrize("code_bits", [None, 0, 2, 5])
def test_round_trip_specials(code_bits):
  round_trip(SPECIALS, code_bits=code_bits)
  # Specials inside ordinary weights, where they are escapes.
  bits = gaussian_bits((40, 24), seed=3)
  bits.ravel()[::53][:SPECIALS.size] = SPECIALS
  round_trip(bits, code_bits=code_bits)


@pytest.mark.parametrize("value", [0x0000, 0x8000, 0x3F80, 0x7FC0, 0x0001])
def test_constant_tensor_stores_one_exponent(value):
  bits = np.full((9, 13), value, np.uint16)
  c = round_trip(bits)
  assert (c.code_bits, c.escape_capacity) == (0, 0)
  assert codec.compressed_bytes(c) == bits.size + 1  # sign|mantissa + table


def test_empty_tensor():
  round_trip(np.zeros((0, 4), np.uint16))
  assert codec.exponent_entropy(np.zeros((0, 4), np.uint16)) == 0.0


def test_hand_counted_bytes_and_contents():
  # Exponents 127 (1.0) x5, 128 (2.0) x2, 126 (0.5), 129 (4.0), 130 (8.0);
  # signs and mantissas vary so they are visible in sign_mantissa.
  values = [1.0, -1.0, 2.0, 0.5, 1.5, 4.0, 1.0, -2.0, 1.0, 8.0]
  bits = np.array(values, ml_dtypes.bfloat16).view(np.uint16)
  c = codec.encode(bits, code_bits=2)
  # Table: the 3 most frequent (ties to the lower exponent), then escape.
  assert c.table.tolist() == [127, 128, 126, 0]
  assert c.escapes.tolist() == [129, 130]
  assert c.sign_mantissa.tolist() == [0, 0x80, 0, 0, 0x40, 0, 0, 0x80, 0, 0]
  # Codes 0 0 1 2 0 3 0 1 0 3: plane 0 bits {2, 5, 7, 9}, plane 1 {3, 5, 9}.
  assert c.code_planes.tolist() == [[4 + 32 + 128 + 512], [8 + 32 + 512]]
  # 10 sign|mantissa + 2 planes x 1 word x 4 + 4 table + 2 escapes.
  assert codec.compressed_bytes(c) == 10 + 8 + 4 + 2 == 24
  assert codec.stored_bytes(10, 2, 2) == 24
  np.testing.assert_array_equal(np.asarray(codec.decode(c)), bits)
  # Unforced: b=0 (raw, 10 + 1 + 10) ties b=1 (10 + 4 + 2 + 5 escapes) at
  # 21 bytes; the smaller width wins. Tiny tensors are stored raw.
  auto = codec.encode(bits)
  assert (auto.code_bits, auto.escape_capacity, auto.is_raw) == (0, 10, True)
  assert codec.compressed_bytes(auto) == 21


def test_chosen_width_is_the_smallest():
  bits = gaussian_bits((4, 64, 48), seed=1)
  auto = codec.encode(bits, batch_dims=1)
  sizes = [codec.compressed_bytes(codec.encode(bits, 1, code_bits=b))
           for b in range(9)]
  assert codec.compressed_bytes(auto) == min(sizes)
  assert auto.code_bits == int(np.argmin(sizes)) == 3
  assert codec.raw_bytes(auto) / codec.compressed_bytes(auto) > 1.35


def test_stacked_experts_share_shapes_and_decode_one_by_one():
  # [L, E, D, F] with a different scale per expert, so tables differ; one
  # expert has many more escapes than the others and sets the capacity.
  L, E, D, F = 2, 3, 16, 24
  bits = np.stack([np.stack([gaussian_bits((D, F), seed=3 * l + e,
                                           scale=2.0 ** (-4 * e - l))
                             for e in range(E)]) for l in range(L)])
  worst = bits[1, 2].reshape(-1)  # a view
  worst[::5] = np.resize(SPECIALS, worst[::5].size)
  c = codec.encode(bits, batch_dims=2, code_bits=3)
  assert c.batch_shape == (L, E) and c.shape == (D, F)
  n, words = D * F, D * F // 32
  assert c.sign_mantissa.shape == (L, E, n)
  assert c.code_planes.shape == (L, E, 3, words)
  assert c.table.shape == (L, E, 8)
  hist = np.stack([np.bincount((bits[idx] >> 7 & 0xFF).ravel(), minlength=256)
                   for idx in np.ndindex(L, E)])
  escapes = n - np.sort(hist, axis=1)[:, ::-1][:, :7].sum(axis=1)
  assert c.escape_capacity == escapes.max() == escapes[-1]
  assert len({tuple(t) for t in c.table.reshape(L * E, 8)}) == L * E
  assert codec.compressed_bytes(c) == L * E * codec.stored_bytes(
      n, 3, c.escape_capacity)
  np.testing.assert_array_equal(np.asarray(codec.decode(c)), bits)
  for l, e in np.ndindex(L, E):
    np.testing.assert_array_equal(np.asarray(codec.decode(c.at((l, e)))),
                                  bits[l, e])


def test_incompressible_expert_makes_the_stack_raw():
  good = gaussian_bits((3, 64, 64))
  noise = np.random.default_rng(0).integers(0, 2**16, (1, 64, 64), np.uint16)
  c = round_trip(np.concatenate([good, noise]), batch_dims=1)
  assert c.is_raw and c.escape_capacity == 64 * 64
  assert not round_trip(good, batch_dims=1).is_raw


def test_decode_in_jit_without_implicit_transfers():
  L, E = 2, 4
  bits = gaussian_bits((L, E, 32, 40), seed=5)
  c = jax.device_put(codec.encode(bits, batch_dims=2))

  @jax.jit
  def decode_row(stack, layer, expert):
    # A traced (layer, expert) picks one row, as a decode step would.
    return codec.decode(stack.at((layer, expert)))

  with jax.transfer_guard("disallow"):
    layer, expert = jax.device_put(np.int32(1)), jax.device_put(np.int32(2))
    row = jax.device_get(decode_row(c, layer, expert))
    stack = jax.device_get(jax.jit(codec.decode)(c))
    with pytest.raises(Exception, match="[Dd]isallowed"):
      codec.decode(codec.encode(bits[0, 0]))  # numpy leaves: implicit
  np.testing.assert_array_equal(row, bits[1, 2])
  np.testing.assert_array_equal(stack, bits)


def test_decoded_bits_are_the_bf16_weights():
  w = jnp.asarray(np.linspace(-3, 3, 77), jnp.bfloat16)
  bits = np.asarray(jax.lax.bitcast_convert_type(w, jnp.uint16))
  out = jax.lax.bitcast_convert_type(codec.decode(codec.encode(bits)),
                                     jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(w))


def test_exponent_entropy():
  # Exponents 126..129 equally often: 2 bits; constant: 0 bits.
  bits = np.repeat(np.array([0x3F00, 0x3F80, 0x4000, 0x4080], np.uint16), 8)
  assert codec.exponent_entropy(bits) == pytest.approx(2.0)
  assert codec.exponent_entropy(np.full(5, 0x3F80, np.uint16)) == 0.0
  # Stacked: the mean of each tensor's entropy, not the pooled one (1 bit).
  stack = np.stack([np.full(8, 0x3F80, np.uint16),
                    np.full(8, 0x4000, np.uint16)])
  assert codec.exponent_entropy(stack, batch_dims=1) == 0.0
  assert codec.exponent_entropy(stack) == pytest.approx(1.0)


@pytest.mark.parametrize("bits, kw, message", [
    (np.zeros(4, np.float32), {}, "uint16.*as_bits"),
    (np.zeros(4, np.uint16), {"batch_dims": 1}, "batch_dims=1"),
    (np.zeros(4, np.uint16), {"code_bits": 9}, "code_bits=9"),
    (np.zeros(4, np.uint16), {"code_bits": 3.0}, "code_bits=3.0"),
])
def test_errors_name_the_value(bits, kw, message):
  with pytest.raises(ValueError, match=message):
    codec.encode(bits, **kw)
