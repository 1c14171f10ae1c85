"""Contiguous KV cache for prefill + incremental decode of a padded batch.

Prompts are left-padded so every row writes the same cache index at each
step; `start` marks each row's first real position and masks the padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from wisp_jax.models import device


@struct.dataclass
class KVCache:
  """Per-layer keys and values of a batch.

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

  def update(self, layer: int, k: jax.Array, v: jax.Array):
    """Writes `k`, `v` `[B, T, Hkv, Dh]` at `index`, returns keys and mask.

    Returns:
      the cache, all keys and values of `layer` `[B, Tmax, Hkv, Dh]`, and
      the attention mask `[B, T, Tmax]`.
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
