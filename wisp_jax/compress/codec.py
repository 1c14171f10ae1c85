"""Lossless exponent coding of bf16 expert weights, decodable inside `jit`.

A bf16 value is sign (1 bit), exponent (8) and mantissa (7). The sign and
mantissa are close to uniformly distributed and are kept raw, one byte per
value; the exponents of trained weights concentrate on a handful of values
(about 2.5 bits of entropy) and are coded.

The code is fixed-width, not Huffman: each tensor gets a table of its
`2**b` most frequent exponents and every value a `b`-bit code. When some of
the tensor's exponents are not in the table, code `2**b - 1` is an escape
and the exponents of the escaped values are listed, raw and in value order,
in an escape list of fixed capacity. Decoding is then data-parallel with no
sequential bit stream: codes are stored as `b` bit planes of `uint32`
words (value `i` is bit `i % 32` of word `i // 32`), so the escapes of a
word are the AND of its planes, and the place of an escape in the list is
the number of escapes before its word (a prefix sum over words, done as
small integer matmuls) plus the popcount of the lower bits of its word.
Every array has a static shape, so a compressed expert fits a fixed device
buffer row and decodes inside a jitted step.

Experts stacked `[L, E, ...]` are encoded together (`batch_dims=2`): each
expert has its own table, all share `b` and the escape capacity, which is
that of the expert with the most escapes. `b` and the capacity are chosen
to minimise the stack's bytes; the search includes `b = 0` with every value
escaped, which is raw storage of the exponents, so a stack that does not
compress is stored raw (`Compressed.is_raw`) at one byte over the raw size
per expert.

Legend (besides the one in `wisp_jax.models.moe`): N values per tensor,
W = ceil(N / 32) code words, C escape capacity, b code bits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Values per code word.
WORD = 32
# Group size of the word-level prefix sum (one `[.., G] @ [G, G]` matmul per
# level of the recursion).
PREFIX_GROUP = 32
# Code widths up to this look the table up with a chain of selects, wider
# ones with a gather (on XLA:CPU the selects decode b = 2, 3 about 1.3x
# faster; at b = 4 the two are even).
MAX_SELECT_BITS = 4


@struct.dataclass
class Compressed:
  """Exponent-coded bf16 bits of one tensor or of a stack of tensors.

  Leading dims `[...]` are the stack (`[]` for one tensor, `[L, E]` for a
  model's experts); every tensor of a stack has the same shapes, so any
  leaf can be indexed, sliced or copied into a slot row like a weight.
  Arrays are numpy as `encode` returns them; `jax.device_put` moves them.

  Attributes:
    sign_mantissa: `[..., N]` uint8, bit 7 the sign, bits 0-6 the mantissa.
    code_planes: `[..., b, W]` uint32; bit `i % 32` of word `i // 32` of
      plane `j` is bit `j` of value `i`'s code; bits past N are zero.
    table: `[..., 2**b]` uint8, the exponent of each code. With escapes,
      the last entry is unused (zero): that code is the escape.
    escapes: `[..., C]` uint8, raw exponents of the escaped values in value
      order, zero-padded to the capacity C (0 when there are no escapes).
    shape: static, the shape of one decoded tensor (N values).
    code_bits: static, b.
  """
  sign_mantissa: jax.Array
  code_planes: jax.Array
  table: jax.Array
  escapes: jax.Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  code_bits: int = struct.field(pytree_node=False)

  @property
  def num_values(self) -> int:
    return math.prod(self.shape)

  @property
  def escape_capacity(self) -> int:
    return self.escapes.shape[-1]

  @property
  def is_raw(self) -> bool:
    """Exponents stored raw: every value is an escape (b = 0, C = N)."""
    return self.code_bits == 0 and self.escape_capacity > 0

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.sign_mantissa.shape[:-1])

  def at(self, index) -> "Compressed":
    """One tensor (or a sub-stack) of a stack, e.g. `c.at((layer, expert))`."""
    return jax.tree.map(lambda a: a[index], self)


def split_bits(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """bf16 bits -> (exponent, sign|mantissa), both uint8, same shape."""
  bits = np.asarray(bits, np.uint16)
  exponent = ((bits >> 7) & 0xFF).astype(np.uint8)
  sign_mantissa = (((bits >> 8) & 0x80) | (bits & 0x7F)).astype(np.uint8)
  return exponent, sign_mantissa


def _check_bits(bits, batch_dims: int) -> None:
  if np.dtype(bits.dtype) != np.uint16:
    raise ValueError(
        f"encode takes raw bf16 bits as uint16, got dtype {bits.dtype}; "
        "convert with `wisp_jax.models.moe.as_bits` (or `.view(np.uint16)` "
        "of a bfloat16 numpy array).")
  if not 0 <= batch_dims < bits.ndim:
    raise ValueError(
        f"batch_dims={batch_dims} for an array of shape {tuple(bits.shape)}: "
        "needs 0 <= batch_dims < ndim, leaving at least one value dim.")
  if math.prod(bits.shape[batch_dims:]) >= 2**31:
    raise ValueError(
        f"a tensor of shape {tuple(bits.shape[batch_dims:])} has 2**31 values "
        "or more; escape indices are int32. Encode it in smaller pieces.")


def _histograms(bits, batch_dims: int) -> np.ndarray:
  """`[X, 256]` int64 exponent counts of each of the X stacked tensors."""
  batch = bits.shape[:batch_dims]
  hist = np.zeros((math.prod(batch), 256), np.int64)
  for x, index in enumerate(np.ndindex(*batch)):
    exponent, _ = split_bits(np.asarray(bits[index]))
    hist[x] = np.bincount(exponent.ravel(), minlength=256)
  return hist


def stored_bytes(num_values: int, code_bits: int, capacity: int) -> int:
  """Bytes of one encoded tensor (`compressed_bytes` of a one-tensor stack)."""
  words = -(-num_values // WORD)
  return num_values + 4 * code_bits * words + 2**code_bits + capacity


def _capacity(hist: np.ndarray, code_bits: int) -> int:
  """Escape capacity the worst tensor needs with `code_bits` (0: none)."""
  counts = -np.sort(-hist, axis=1)  # [X, 256] descending
  if np.all((hist > 0).sum(axis=1) <= 2**code_bits):
    return 0
  if code_bits == 0:
    return int(hist.sum(axis=1).max())  # escapes everything: raw
  return int(counts[:, 2**code_bits - 1:].sum(axis=1).max())


def choose_code(hist: np.ndarray, num_values: int) -> tuple[int, int]:
  """The (code_bits, capacity) with the fewest bytes for these histograms.

  Ties go to the smaller b (less to unpack).
  """
  best = None
  for code_bits in range(9):
    capacity = _capacity(hist, code_bits)
    size = stored_bytes(num_values, code_bits, capacity)
    if best is None or size < best[0]:
      best = (size, code_bits, capacity)
  return best[1], best[2]


def _pack_planes(code: np.ndarray, code_bits: int) -> np.ndarray:
  """`[N]` codes -> `[b, W]` uint32 bit planes (value i: word i//32, bit i%32)."""
  words = -(-code.size // WORD)
  if code_bits == 0:
    return np.zeros((0, words), np.uint32)
  padded = np.zeros(words * WORD, np.uint8)
  padded[:code.size] = code
  planes = [np.packbits((padded >> j) & 1, bitorder="little").view("<u4")
            for j in range(code_bits)]
  return np.stack(planes).astype(np.uint32).reshape(code_bits, words)


def encode(bits, batch_dims: int = 0, code_bits: int | None = None
           ) -> Compressed:
  """Encodes raw bf16 bits losslessly (numpy; run at load time).

  Args:
    bits: `[..., *shape]` uint16 bf16 bits; numpy or a host jax array (read
      one tensor at a time).
    batch_dims: how many leading dims are a stack of tensors (2 for
      `[L, E, D, F]` experts). Each tensor gets its own table; all share the
      code width and escape capacity, so they have the same shapes.
    code_bits: force the code width b (0-8) instead of the smallest choice.

  Returns:
    the `Compressed` stack, numpy arrays.

  Raises:
    ValueError: bits not uint16, a bad `batch_dims` or `code_bits`.
  """
  _check_bits(bits, batch_dims)
  if code_bits is not None and (not isinstance(code_bits, (int, np.integer))
                                or not 0 <= code_bits <= 8):
    raise ValueError(f"code_bits={code_bits!r}; needs an int in 0..8 or None.")
  batch, shape = tuple(bits.shape[:batch_dims]), tuple(bits.shape[batch_dims:])
  num_values = math.prod(shape)
  hist = _histograms(bits, batch_dims)
  if code_bits is None:
    code_bits, capacity = choose_code(hist, num_values)
  else:
    code_bits = int(code_bits)
    capacity = _capacity(hist, code_bits)
  escaping = capacity > 0
  table_size = 2**code_bits
  known = table_size - 1 if escaping else table_size
  words = -(-num_values // WORD)
  count = math.prod(batch)
  sign_mantissa = np.zeros((count, num_values), np.uint8)
  planes = np.zeros((count, code_bits, words), np.uint32)
  table = np.zeros((count, table_size), np.uint8)
  escapes = np.zeros((count, capacity), np.uint8)
  for x, index in enumerate(np.ndindex(*batch)):
    exponent, sign_mantissa[x] = split_bits(np.asarray(bits[index]).ravel())
    by_count = np.argsort(-hist[x], kind="stable").astype(np.uint8)
    table[x, :known] = by_count[:known]
    code_of = np.full(256, table_size - 1, np.uint8)
    code_of[by_count[:known]] = np.arange(known, dtype=np.uint8)
    code = code_of[exponent]
    planes[x] = _pack_planes(code, code_bits)
    if escaping:
      escaped = exponent[code == table_size - 1]
      escapes[x, :escaped.size] = escaped
  def unflatten(a):  # [X, ...] -> [*batch, ...]
    return a.reshape(batch + a.shape[1:])
  return Compressed(sign_mantissa=unflatten(sign_mantissa),
                    code_planes=unflatten(planes), table=unflatten(table),
                    escapes=unflatten(escapes), shape=shape,
                    code_bits=code_bits)


def _exclusive_prefix_sum(x: jax.Array) -> jax.Array:
  """Exclusive prefix sum of `[n]` int32, as int32 matmuls of G-groups.

  On XLA:CPU this is about 1.7x faster than `jnp.cumsum` (a log-depth
  scan of slices); int32 keeps it exact on every backend, where an f32
  matmul could run in TF32 on a GPU.
  """
  n, g = x.shape[0], PREFIX_GROUP
  if n == 1:
    return jnp.zeros_like(x)
  size = min(n, g)
  # [G, G]: strictly upper triangular, entry (j, i) = 1 for j < i.
  before = jnp.triu(jnp.ones((size, size), jnp.int32), 1)
  if n <= g:
    return jnp.dot(x, before, preferred_element_type=jnp.int32)
  groups = -(-n // g)
  # [n / G, G]
  grouped = jnp.pad(x, (0, groups * g - n)).reshape(groups, g)
  within = jnp.dot(grouped, before, preferred_element_type=jnp.int32)
  base = _exclusive_prefix_sum(jnp.sum(grouped, axis=1))
  return (within + base[:, None]).reshape(-1)[:n]


def _lookup(table: jax.Array, code: jax.Array, entries: int) -> jax.Array:
  """`table[code]` as uint32, for codes below `entries`."""
  if entries > 2**MAX_SELECT_BITS:
    return jnp.take(table, code, mode="clip").astype(jnp.uint32)
  exponent = jnp.broadcast_to(table[0].astype(jnp.uint32), code.shape)
  for k in range(1, entries):
    exponent = jnp.where(code == k, table[k].astype(jnp.uint32), exponent)
  return exponent


def _decode_one(c: Compressed) -> jax.Array:
  """Decodes one tensor (no leading dims)."""
  n, b, capacity = c.num_values, c.code_bits, c.escape_capacity
  words = -(-n // WORD)
  escape = 2**b - 1
  # [W, 32]
  shifts = jnp.arange(WORD, dtype=jnp.uint32)
  sign_mantissa = jnp.pad(c.sign_mantissa, (0, words * WORD - n)).reshape(
      words, WORD).astype(jnp.uint32)
  if c.is_raw:
    exponent = jnp.pad(c.escapes, (0, words * WORD - n)).reshape(
        words, WORD).astype(jnp.uint32)
  else:
    code = jnp.zeros((words, WORD), jnp.uint32)
    for j in range(b):
      code = code | (((c.code_planes[j][:, None] >> shifts) & 1) << j)
    exponent = _lookup(c.table, code, escape if capacity else 2**b)
    if capacity:
      # [W] bit i of word w set where value 32 w + i is escaped.
      escaped = c.code_planes[0]
      for j in range(1, b):
        escaped = escaped & c.code_planes[j]
      first = _exclusive_prefix_sum(
          jax.lax.population_count(escaped).astype(jnp.int32))
      lower = escaped[:, None] & ((jnp.uint32(1) << shifts) - 1)
      # [W, 32] place of each value's exponent in the escape list.
      place = first[:, None] + jax.lax.population_count(lower).astype(
          jnp.int32)
      listed = jnp.take(c.escapes, place, mode="clip").astype(jnp.uint32)
      exponent = jnp.where(code == escape, listed, exponent)
  bits = (((sign_mantissa & 0x80) << 8) | (exponent << 7)
          | (sign_mantissa & 0x7F))
  return bits.reshape(-1)[:n].astype(jnp.uint16).reshape(c.shape)


def decode(c: Compressed) -> jax.Array:
  """Decodes to the exact bf16 bits; jittable, static output shape.

  Args:
    c: a `Compressed` tensor or stack (numpy or device arrays).

  Returns:
    `[..., *c.shape]` uint16 bits (`moe.as_dtype` reads them as bf16).
  """
  fn = _decode_one
  for _ in c.batch_shape:
    fn = jax.vmap(fn)
  return fn(jax.tree.map(jnp.asarray, c))


def compressed_bytes(c: Compressed) -> int:
  """Bytes of every array of `c` (tables and escape padding included)."""
  return sum(int(a.nbytes) for a in jax.tree.leaves(c))


def raw_bytes(c: Compressed) -> int:
  """Bytes of the bf16 tensors `c` encodes."""
  return 2 * c.num_values * math.prod(c.batch_shape)


def exponent_entropy(bits, batch_dims: int = 0) -> float:
  """Shannon entropy of the exponents, bits per value.

  Args:
    bits: `[..., *shape]` uint16 bf16 bits.
    batch_dims: leading stack dims; the result is then the mean over the
      stacked tensors of each one's entropy (each has its own table).

  Returns:
    entropy in bits; `8 + entropy` bits per value bounds any exponent code
    that keeps sign and mantissa raw.
  """
  _check_bits(bits, batch_dims)
  hist = _histograms(bits, batch_dims).astype(np.float64)
  if math.prod(bits.shape[batch_dims:]) == 0:
    return 0.0
  p = hist / hist.sum(axis=1, keepdims=True)
  logs = np.log2(np.where(p > 0, p, 1.0))
  return float(np.mean(-(p * logs).sum(axis=1)))
