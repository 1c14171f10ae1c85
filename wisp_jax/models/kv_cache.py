"""KV views: what attention reads and writes, behind one protocol.

`Decoder.forward` sees the cache only through `KVView`: `positions(t)`,
`update(layer, k, v)` and `advance(t)`, with `layer` a traced index inside
the layer loop. Three views implement it:

- `CausalView`: no cache, each pass attends causally over its own tokens
  (`MoEModel.__call__`, training);
- `KVCache`: a contiguous cache of one left-padded batch (`generate`);
- `wisp_jax.serving.kv_pool.PagedKV`: the serving engine's block pool.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import struct

from wisp_jax.models import device


class KVView(Protocol):
  """The interface `Decoder.forward` attends through (a pytree)."""

  def positions(self, t: int) -> jax.Array:
    """RoPE positions `[B, T]` of the next `t` tokens of each row."""

  def update(self, layer, k: jax.Array, v: jax.Array
             ) -> tuple["KVView", jax.Array, jax.Array, jax.Array]:
    """Stores `k`, `v` `[B, T, Hkv, Dh]` of `layer` (traced index).

    Returns:
      the updated view, the keys and values to attend to `[B, S, Hkv, Dh]`
      and the mask `[B, T, S]` (True: the query may see the key; no row is
      fully masked).
    """

  def advance(self, t: int) -> "KVView":
    """The view after a pass of `t` tokens."""


@struct.dataclass
class CausalView:
  """No cache: each pass attends causally over its own `T` tokens.

  Attributes:
    batch: B (static).
  """
  batch: int = struct.field(pytree_node=False)

  def positions(self, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (self.batch, t))

  def update(self, layer, k, v):
    del layer
    t = k.shape[1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)),
                            (k.shape[0], t, t))
    return self, k, v, mask

  def advance(self, t: int) -> "CausalView":
    del t
    return self


@struct.dataclass
class KVCache:
  """Per-layer keys and values of a left-padded batch.

  Prompts are left-padded so every row writes the same cache index at each
  step; `start` marks each row's first real position and masks the padding.

  Attributes:
    k: `[L, B, Tmax, Hkv, Dh]` keys, model dtype.
    v: `[L, B, Tmax, Hkv, Dh]` values, model dtype.
    start: `[B]` int32 cache index of each row's first real token.
    index: `[]` int32 cache index where the next tokens are written.
  """
  k: jax.Array
  v: jax.Array
  start: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype,
             start: jax.Array) -> "KVCache":
    """Zeroed cache; `start` `[B]` int32 is a device array."""
    shape = (num_layers, batch, max_len, kv_heads, head_dim)
    return cls(k=device.zeros(shape, dtype), v=device.zeros(shape, dtype),
               start=start, index=device.zeros((), jnp.int32))

  def update(self, layer, k: jax.Array, v: jax.Array):
    """Writes `k`, `v` `[B, T, Hkv, Dh]` at `index`; see `KVView.update`.

    Returns keys and values `[B, Tmax, Hkv, Dh]` and the mask `[B, T, Tmax]`.
    """
    t = k.shape[1]
    at = (layer, 0, self.index, 0, 0)
    new_k = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at)
    new_v = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at)
    max_len = self.k.shape[2]
    # [T] cache index of each query, [Tmax] of each key.
    query_at = self.index + jnp.arange(t, dtype=jnp.int32)
    key_at = jnp.arange(max_len, dtype=jnp.int32)
    keys, queries = key_at[None, None, :], query_at[None, :, None]
    # Padding queries see only themselves, so no row is fully masked (NaN).
    mask = (keys <= queries) & ((keys >= self.start[:, None, None]) |
                                (keys == queries))
    cache = self.replace(k=new_k, v=new_v)
    return cache, new_k[layer], new_v[layer], mask

  def positions(self, t: int) -> jax.Array:
    """RoPE positions `[B, T]` of the next `t` tokens of each row."""
    at = self.index + jnp.arange(t, dtype=jnp.int32)
    return at[None, :] - self.start[:, None]

  def advance(self, t: int) -> "KVCache":
    return self.replace(index=self.index + t)
