"""Block-paged KV cache: one pool of fixed-size blocks shared by all requests.

The pool holds `[L, NB, BS, Hkv, Dh]` keys and values (NB blocks of BS
token positions; one block id covers every layer). Each request owns a list
of blocks (its block table); the host-side `serving.blocks.BlockAllocator` hands
blocks out and takes them back. Inside a jitted step, `PagedKV` is the view of one
batch: it implements the cache interface of
`wisp_jax.models.transformer.Decoder.forward` (`update`, `positions`,
`advance`), so the model code runs unchanged over rows of different lengths.

NB is a runtime capacity (a shape of the pool, chosen by the budget), not a
model constant; MB, the block-table width, is `ceil(max_seq_len / BS)`.

Shape legend as in `wisp_jax.models.moe`, plus NB pool blocks, BS block size
(token positions per block), MB blocks per block table, Hkv kv heads, Dh
head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from wisp_jax.models import device
from wisp_jax.models.config import MoEConfig


def block_bytes(config: MoEConfig, block_size: int, dtype) -> int:
  """Bytes of one block: keys and values of BS positions in every layer."""
  c = config
  return (2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim *
          jnp.dtype(dtype).itemsize)


@struct.dataclass
class KVPool:
  """Keys and values of every block of the pool (device arrays).

  Attributes:
    k: `[L, NB, BS, Hkv, Dh]` keys, model dtype.
    v: `[L, NB, BS, Hkv, Dh]` values, model dtype.
  """
  k: jax.Array
  v: jax.Array

  @classmethod
  def create(cls, config: MoEConfig, num_blocks: int, block_size: int,
             dtype) -> "KVPool":
    """A zeroed pool of `num_blocks` blocks of `block_size` positions."""
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}.")
    c = config
    shape = (c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    return cls(k=device.zeros(shape, jnp.dtype(dtype)),
               v=device.zeros(shape, jnp.dtype(dtype)))

  @property
  def num_blocks(self) -> int:
    return self.k.shape[1]

  @property
  def block_size(self) -> int:
    return self.k.shape[2]

  @property
  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes


def zero_blocks(pool: KVPool, block_ids: jax.Array) -> KVPool:
  """`pool` with blocks `block_ids` `[N]` int32 zeroed in every layer.

  Ids >= NB are ignored (the padding of a fixed-size id list).
  """
  def zero(x):
    return x.at[:, block_ids].set(jnp.zeros((), x.dtype), mode="drop")
  return KVPool(k=zero(pool.k), v=zero(pool.v))


@struct.dataclass
class PagedKV:
  """The pool seen by one batch of rows of different lengths.

  Rows whose `write` is False (batch padding) read like any row but never
  write: the engine fills them with a copy of row 0, so they compute what
  row 0 computes and add no expert demand of their own.

  Attributes:
    pool: the `KVPool`.
    block_table: `[B, MB]` int32 blocks of each row, in position order.
    length: `[B]` int32 positions of each row already in the pool (the
      position of its first new token).
    num_new: `[B]` int32 real new tokens of this pass (the rest of the `T`
      tokens is padding: never written, never seen by real queries; see
      `positions`).
    write: `[B]` bool, whether the row's new keys and values are stored.
  """
  pool: KVPool
  block_table: jax.Array
  length: jax.Array
  num_new: jax.Array
  write: jax.Array

  def positions(self, t: int) -> jax.Array:
    """Positions `[B, T]` of the next `t` tokens of each row.

    Padding tokens (index >= `num_new`) take the position of the row's last
    real token: given that token's id too, they compute exactly what it
    computes, so they route to no expert the real tokens do not need.
    """
    last = jnp.maximum(self.num_new - 1, 0)[:, None]
    return self.length[:, None] + jnp.minimum(
        jnp.arange(t, dtype=jnp.int32)[None, :], last)

  def update(self, layer: int, k: jax.Array, v: jax.Array):
    """Stores the new `k`, `v` `[B, T, Hkv, Dh]`, returns what to attend to.

    Returns:
      the view with the updated pool; keys and values of `layer` gathered
      through the block table `[B, MB * BS, Hkv, Dh]`; the mask
      `[B, T, MB * BS]` (True: the query may see the key). A query sees its
      row's positions up to its own and below `length + num_new`; key 0 is
      always visible so no row (padding included) is fully masked.
    """
    pool = self.pool
    num_blocks, block_size = pool.num_blocks, pool.block_size
    max_blocks = self.block_table.shape[1]
    t = k.shape[1]
    # [B, T]
    positions = self.positions(t)
    stored = ((jnp.arange(t, dtype=jnp.int32)[None, :] < self.num_new[:, None])
              & self.write[:, None])
    block_index = jnp.clip(positions // block_size, 0, max_blocks - 1)
    # [B, T] pool block of each new token; NB (dropped) where not stored.
    block = jnp.where(stored, jnp.take_along_axis(self.block_table,
                                                  block_index, axis=1),
                      num_blocks)
    offset = positions % block_size
    new_k = pool.k.at[layer, block, offset].set(k.astype(pool.k.dtype),
                                                mode="drop")
    new_v = pool.v.at[layer, block, offset].set(v.astype(pool.v.dtype),
                                                mode="drop")
    b = k.shape[0]
    span = max_blocks * block_size
    # [B, MB, BS, Hkv, Dh] -> [B, MB * BS, Hkv, Dh]
    keys = new_k[layer][self.block_table].reshape((b, span) + k.shape[2:])
    values = new_v[layer][self.block_table].reshape((b, span) + v.shape[2:])
    # [S] key positions; [B, T, S] mask.
    key_at = jnp.arange(span, dtype=jnp.int32)[None, None, :]
    total = (self.length + self.num_new)[:, None, None]
    mask = ((key_at <= positions[:, :, None]) & (key_at < total)) | (
        key_at == 0)
    view = self.replace(pool=KVPool(k=new_k, v=new_v))
    return view, keys, values, mask

  def advance(self, t: int) -> "PagedKV":
    """The view after this pass: real new tokens join each row's length."""
    del t  # Rows advance by their own `num_new`, not by the padded T.
    return self.replace(length=self.length + self.num_new,
                        num_new=jnp.zeros_like(self.num_new))

