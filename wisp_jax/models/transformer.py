"""Flax NNX decoder-only MoE transformer (Mixtral / Qwen2-MoE / Qwen3-MoE /
OLMoE family).

`MoEModel` holds a dense `Decoder` and an `ExpertStore` side by side: jitted
steps split only the decoder, so the expert weights can live elsewhere (a
host bank, a slot pool) and reach the MoE blocks through an `ExpertSource`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.experts import ExpertSource, ResidentSource
from wisp_jax.models.kv_cache import CausalView, KVView


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

  Keys and values no query may see (stale or padding positions of a paged
  pool, which may hold anything, NaN included) cannot leak into the output:
  their scores are -inf and their values are zeroed before the product,
  since 0 * NaN is NaN. For finite values this changes no bit (their
  weights are exactly 0 either way).
  """
  b, t, h, dh = q.shape
  hkv = k.shape[2]
  # [B, T, Hkv, G, Dh]: query head j uses kv head j // G, as in HF.
  qg = q.reshape(b, t, hkv, h // hkv, dh)
  scores = jnp.einsum("btngd,bsnd->bngts", qg, k).astype(jnp.float32)
  scores = scores / np.sqrt(dh).astype(np.float32)
  scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  # [B, S] keys some query of the row sees.
  seen = jnp.any(mask, axis=1)
  v = jnp.where(seen[:, :, None, None], v, jnp.zeros((), v.dtype))
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


@struct.dataclass
class ForwardOutput:
  """What one forward pass returns.

  Attributes:
    logits: `[B, T, V]` in the model dtype.
    kv: the KV view after the pass's writes (not advanced).
    carry: the expert source's new carry.
    routing_ids: `[L, B, T, K]` int32 routed expert ids.
    routing_weights: `[L, B, T, K]` gate weights.
    router_probs: `[L, N, E]` float32 router softmax, when asked for
      (training's load-balancing loss), else None.
  """
  logits: jax.Array
  kv: Any
  carry: Any
  routing_ids: jax.Array
  routing_weights: jax.Array
  router_probs: jax.Array | None = None


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
  """One module whose every parameter is the `[L, ...]` stack of the
  layers' parameters (MaxText's scanned layers)."""
  graphdef, _ = nnx.split(layers[0])
  states = [nnx.state(layer) for layer in layers]
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class Decoder(nnx.Module):
  """Embeddings, decoder layers, final norm and LM head (no routed experts).

  `layers` is one `DecoderLayer` whose parameters are stacked `[L, ...]`;
  `forward` runs one layer body in a `jax.lax.fori_loop` over a traced
  layer index, so a step's program (and its compile time) does not grow
  with depth. `MoEConfig.unroll_layers` unrolls the same body in Python
  (debugging only).
  """

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype):
    c = config
    self.config = c
    # [V, D]
    self.embed = nnx.Param(_init(rngs, (c.vocab_size, c.d_model), c.d_model,
                                 dtype))
    self.layers = stack_layers(
        [DecoderLayer(c, rngs=rngs, dtype=dtype) for _ in range(c.num_layers)])
    self.final_norm = nnx.Param(jnp.ones((c.d_model,), dtype))
    if not c.tie_embeddings:
      # [D, V]
      self.lm_head = nnx.Param(_init(rngs, (c.d_model, c.vocab_size),
                                     c.d_model, dtype))

  def forward(self, tokens: jax.Array, positions: jax.Array | None,
              kv: KVView | None, source: ExpertSource, carry: Any = None, *,
              router_probs: bool = False) -> ForwardOutput:
    """One forward pass over `T` new tokens.

    Args:
      tokens: `[B, T]` int token ids.
      positions: `[B, T]` int32 RoPE positions, or None for
        `kv.positions(T)`.
      kv: the cache view to read and extend, or None for plain causal
        attention over `tokens` alone (`CausalView`).
      source: where the routed experts come from.
      carry: the source's state.
      router_probs: also return the router softmax of every layer.

    Returns:
      a `ForwardOutput`.
    """
    c = self.config
    b, t = tokens.shape
    n = b * t
    if kv is None:
      kv = CausalView(batch=b)
    if positions is None:
      positions = kv.positions(t)
    layer_def, layer_params = nnx.split(self.layers)

    def body(index, loop):
      x, kv, carry, ids_all, weights_all, probs_all = loop
      layer = nnx.merge(layer_def, jax.tree.map(lambda p: p[index],
                                                layer_params))
      h = rms_norm(x, layer.input_norm[...], c.rms_eps)
      q, k, v = layer.attn.qkv(h, positions)
      kv, keys, values, mask = kv.update(index, k, v)
      x = x + layer.attn.out(attend(q, keys, values, mask))

      # [N, D]
      h = rms_norm(x, layer.post_attn_norm[...], c.rms_eps).reshape(n, -1)
      # [N, E]
      logits = h @ layer.router[...]
      ids, weights = moe.route(logits, c.top_k, c.norm_topk_prob, h.dtype)
      expert_out, carry = source.layer(index, h, ids, carry)
      y = moe.combine(expert_out, weights)
      if c.shared_ffn:
        y = y + layer.shared_expert(h)
      x = x + y.reshape(b, t, -1)
      ids_all = ids_all.at[index].set(ids.reshape(b, t, -1))
      weights_all = weights_all.at[index].set(weights.reshape(b, t, -1))
      if probs_all is not None:
        probs_all = probs_all.at[index].set(
            jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
      return x, kv, carry, ids_all, weights_all, probs_all

    x = self.embed[...][tokens]
    # [L, B, T, K]
    routing = jnp.zeros((c.num_layers, b, t, c.top_k), jnp.int32)
    loop = (x, kv, carry, routing, routing.astype(x.dtype),
            jnp.zeros((c.num_layers, n, c.num_experts), jnp.float32)
            if router_probs else None)
    if c.unroll_layers:
      for index in range(c.num_layers):
        loop = body(index, loop)
    else:
      loop = jax.lax.fori_loop(0, c.num_layers, body, loop)
    x, kv, carry, ids_all, weights_all, probs_all = loop
    carry = source.end_step(carry)

    x = rms_norm(x, self.final_norm[...], c.rms_eps)
    head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("btd,dv->btv", x, head)
    return ForwardOutput(logits=logits, kv=kv, carry=carry,
                         routing_ids=ids_all, routing_weights=weights_all,
                         router_probs=probs_all)


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

  def __call__(self, tokens) -> jax.Array:
    """Full-sequence logits `[B, T, V]` for int tokens `[B, T]` (jitted;
    compiles once per token shape).

    Concrete tokens are checked on the host before the jitted call: an id
    outside `[0, vocab_size)` would otherwise be clamped by the embedding
    gather without a word. Traced tokens (a caller's own `jit`) cannot be
    checked here.

    Raises:
      ValueError: if tokens are not an integer `[B, T]` array, or an id lies
        outside `[0, vocab_size)`.
    """
    if not isinstance(tokens, jax.core.Tracer):
      host = np.asarray(jax.device_get(tokens))
      if host.ndim != 2 or not (np.issubdtype(host.dtype, np.integer)
                                or host.size == 0):
        raise ValueError(f"model(tokens) takes int tokens [B, T], got shape "
                         f"{host.shape} of dtype {host.dtype}.")
      vocab = self.config.vocab_size
      if host.size and (host.min() < 0 or host.max() >= vocab):
        bad = host[(host < 0) | (host >= vocab)]
        raise ValueError(
            f"model(tokens): {bad.size} token id(s) outside [0, {vocab}), "
            f"e.g. {int(bad[0])}; the embedding has vocab_size={vocab} rows. "
            "Tokenize with this model's tokenizer.")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
      raise ValueError(f"model(tokens) takes int tokens [B, T], got shape "
                       f"{tokens.shape}.")
    graphdef, state = nnx.split(self)
    return _full_sequence_logits(graphdef, state, tokens)


@functools.partial(jax.jit, static_argnums=0)
def _full_sequence_logits(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  return model.decoder.forward(
      tokens, None, None, ResidentSource(model.experts.weights())).logits
