"""Flax NNX decoder-only MoE transformer (Mixtral / Qwen2-MoE / Qwen3-MoE /
OLMoE family).

`MoEModel` holds a dense `Decoder` and an `ExpertStore` side by side: jitted
steps split only the decoder, so the expert weights can live elsewhere (a
host bank, a slot pool) and reach the MoE blocks through an `ExpertSource`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.experts import ExpertSource, ResidentSource
from wisp_jax.models.kv_cache import KVCache


class ExpertParam(nnx.Param):
  """A routed-expert weight `[L, E, ...]`: the future host bank."""


def _init(rngs: nnx.Rngs, shape, fan_in: int, dtype) -> jax.Array:
  return (jax.random.normal(rngs.params(), shape, jnp.float32) /
          np.sqrt(fan_in)).astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, scaled in the input dtype (as HF does)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split ("rotate_half") layout.

  Args:
    x: `[B, T, H, Dh]`.
    positions: `[B, T]` int32.
    theta: RoPE base.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) / half))
  # [B, T, Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array) -> jax.Array:
  """Grouped-query attention.

  Args:
    q: `[B, T, H, Dh]` queries.
    k: `[B, S, Hkv, Dh]` keys (S key positions).
    v: `[B, S, Hkv, Dh]` values.
    mask: `[B, T, S]` bool, True where a query may see a key.

  Returns:
    `[B, T, H, Dh]`.
  """
  b, t, h, dh = q.shape
  hkv = k.shape[2]
  # [B, T, Hkv, G, Dh]: query head j uses kv head j // G, as in HF.
  qg = q.reshape(b, t, hkv, h // hkv, dh)
  scores = jnp.einsum("btngd,bsnd->bngts", qg, k).astype(jnp.float32)
  scores = scores / np.sqrt(dh).astype(np.float32)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bngts,bsnd->btngd", probs, v)
  return out.reshape(b, t, h, dh)


class Attention(nnx.Module):
  """GQA with RoPE, optional q/k norm and q/k/v biases."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype):
    c = config
    self.config = c
    d, h, hkv, dh = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    # Each projection is [in, out]; einsum "btd,dq->btq".
    self.q_proj = nnx.Param(_init(rngs, (d, h * dh), d, dtype))
    self.k_proj = nnx.Param(_init(rngs, (d, hkv * dh), d, dtype))
    self.v_proj = nnx.Param(_init(rngs, (d, hkv * dh), d, dtype))
    self.o_proj = nnx.Param(_init(rngs, (h * dh, d), h * dh, dtype))
    if c.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((h * dh,), dtype))
      self.k_bias = nnx.Param(jnp.zeros((hkv * dh,), dtype))
      self.v_bias = nnx.Param(jnp.zeros((hkv * dh,), dtype))
    if c.qk_norm == "per_head":
      self.q_norm = nnx.Param(jnp.ones((dh,), dtype))
      self.k_norm = nnx.Param(jnp.ones((dh,), dtype))
    elif c.qk_norm == "full":
      self.q_norm = nnx.Param(jnp.ones((h * dh,), dtype))
      self.k_norm = nnx.Param(jnp.ones((hkv * dh,), dtype))

  def qkv(self, x: jax.Array, positions: jax.Array):
    """Projects `[B, T, D]` to RoPE'd q `[B, T, H, Dh]` and k, v `[B, T, Hkv, Dh]`."""
    c = self.config
    b, t, _ = x.shape
    q = jnp.einsum("btd,dq->btq", x, self.q_proj[...])
    k = jnp.einsum("btd,dq->btq", x, self.k_proj[...])
    v = jnp.einsum("btd,dq->btq", x, self.v_proj[...])
    if c.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    if c.qk_norm == "full":
      q = rms_norm(q, self.q_norm[...], c.rms_eps)
      k = rms_norm(k, self.k_norm[...], c.rms_eps)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "per_head":
      q = rms_norm(q, self.q_norm[...], c.rms_eps)
      k = rms_norm(k, self.k_norm[...], c.rms_eps)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def out(self, attn: jax.Array) -> jax.Array:
    b, t = attn.shape[:2]
    return jnp.einsum("btq,qd->btd", attn.reshape(b, t, -1), self.o_proj[...])


class DecoderLayer(nnx.Module):
  """Pre-norm attention + MoE block; the routed experts live outside."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype):
    c = config
    self.config = c
    self.input_norm = nnx.Param(jnp.ones((c.d_model,), dtype))
    self.attn = Attention(c, rngs=rngs, dtype=dtype)
    self.post_attn_norm = nnx.Param(jnp.ones((c.d_model,), dtype))
    # [D, E]
    self.router = nnx.Param(_init(rngs, (c.d_model, c.num_experts),
                                  c.d_model, dtype))
    if c.shared_ffn:
      self.shared_gate_proj = nnx.Param(
          _init(rngs, (c.d_model, c.shared_ffn), c.d_model, dtype))
      self.shared_up_proj = nnx.Param(
          _init(rngs, (c.d_model, c.shared_ffn), c.d_model, dtype))
      self.shared_down_proj = nnx.Param(
          _init(rngs, (c.shared_ffn, c.d_model), c.shared_ffn, dtype))
      if c.shared_expert_gate:
        # [D, 1]
        self.shared_expert_gate = nnx.Param(
            _init(rngs, (c.d_model, 1), c.d_model, dtype))

  def shared_expert(self, x: jax.Array) -> jax.Array:
    """Qwen2-MoE shared SwiGLU expert, optionally sigmoid-gated; `[N, D]`."""
    h = jax.nn.silu(x @ self.shared_gate_proj[...]) * (x @ self.shared_up_proj[...])
    y = h @ self.shared_down_proj[...]
    if self.config.shared_expert_gate:
      y = jax.nn.sigmoid(x @ self.shared_expert_gate[...]) * y
    return y


class Decoder(nnx.Module):
  """Embeddings, decoder layers, final norm and LM head (no routed experts)."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype):
    c = config
    self.config = c
    # [V, D]
    self.embed = nnx.Param(_init(rngs, (c.vocab_size, c.d_model), c.d_model,
                                 dtype))
    self.layers = nnx.List(
        [DecoderLayer(c, rngs=rngs, dtype=dtype) for _ in range(c.num_layers)])
    self.final_norm = nnx.Param(jnp.ones((c.d_model,), dtype))
    if not c.tie_embeddings:
      # [D, V]
      self.lm_head = nnx.Param(_init(rngs, (c.d_model, c.vocab_size),
                                     c.d_model, dtype))

  def forward(self, tokens: jax.Array, positions: jax.Array,
              kv: KVCache | None, source: ExpertSource,
              carry: Any = None) -> tuple[jax.Array, KVCache | None, Any,
                                          tuple[jax.Array, jax.Array]]:
    """One forward pass over `T` new tokens.

    Args:
      tokens: `[B, T]` int token ids.
      positions: `[B, T]` int32 RoPE positions.
      kv: cache to read and extend, or None for plain causal attention over
        `tokens` alone.
      source: where the routed experts come from.
      carry: the source's state.

    Returns:
      logits `[B, T, V]`, the updated cache, the source's new carry, and the
      routing seen: ids `[L, B, T, K]` int32 and gate weights `[L, B, T, K]`.
    """
    c = self.config
    b, t = tokens.shape
    x = self.embed[...][tokens]
    routed_ids, routed_weights = [], []
    if kv is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = jnp.broadcast_to(causal, (b, t, t))
    for layer_index, layer in enumerate(self.layers):
      h = rms_norm(x, layer.input_norm[...], c.rms_eps)
      q, k, v = layer.attn.qkv(h, positions)
      if kv is None:
        attn = attend(q, k, v, mask)
      else:
        kv, keys, values, mask = kv.update(layer_index, k, v)
        attn = attend(q, keys, values, mask)
      x = x + layer.attn.out(attn)

      h = rms_norm(x, layer.post_attn_norm[...], c.rms_eps).reshape(b * t, -1)
      ids, weights = moe.route(h @ layer.router[...], c.top_k,
                               c.norm_topk_prob, h.dtype)
      expert_out, carry = source(layer_index, h, ids, carry)
      y = moe.combine(expert_out, weights)
      if c.shared_ffn:
        y = y + layer.shared_expert(h)
      x = x + y.reshape(b, t, -1)
      routed_ids.append(ids.reshape(b, t, -1))
      routed_weights.append(weights.reshape(b, t, -1))

    x = rms_norm(x, self.final_norm[...], c.rms_eps)
    head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head)
    return logits, kv, carry, (jnp.stack(routed_ids), jnp.stack(routed_weights))


class ExpertStore(nnx.Module):
  """The routed experts of every layer, stacked `[L, E, ...]`."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype):
    c = config
    shape_in = (c.num_layers, c.num_experts, c.d_model, c.expert_ffn)
    shape_out = (c.num_layers, c.num_experts, c.expert_ffn, c.d_model)
    self.gate = ExpertParam(_init(rngs, shape_in, c.d_model, dtype))
    self.up = ExpertParam(_init(rngs, shape_in, c.d_model, dtype))
    self.down = ExpertParam(_init(rngs, shape_out, c.expert_ffn, dtype))

  def weights(self) -> moe.ExpertWeights:
    return moe.ExpertWeights(self.gate[...], self.up[...], self.down[...])


class MoEModel(nnx.Module):
  """A decoder plus its routed experts; `model(tokens)` gives logits."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs | None = None,
               dtype=jnp.float32):
    rngs = rngs or nnx.Rngs(0)
    self.config = config
    self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
    self.experts = ExpertStore(config, rngs=rngs, dtype=dtype)

  @property
  def dtype(self):
    return self.decoder.embed[...].dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full-sequence logits `[B, T, V]` for int tokens `[B, T]`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _, _, _ = self.decoder.forward(
        tokens, positions, None, ResidentSource(self.experts.weights()))
    return logits
