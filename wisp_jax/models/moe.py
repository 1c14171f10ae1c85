"""Routing, expert computation and combine: module-level pure functions.

Shape legend (used across wisp_jax): B batch, T time, D model, F expert ffn,
E experts, K top-k, L layers, S slots, H heads, N tokens (B*T flattened),
R rows of an expert table (E for a resident layer, S for a slot pool).

Exactness: every expert source calls `expert_ffn` exactly once per layer
and group, with the same token count N and the same rows' *bits*, so a
token's expert output does not depend on where its expert's weights came
from (resident, host, slot). Two calls on the same tokens in one layer are
avoided: XLA may then fuse them into code with other rounding. `combine` sums
the K outputs in routing order, never in slot or expert-id order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Token chunk of the gathered expert computation: bounds the gathered weight
# working set to CHUNK x K experts, whatever the prefill length.
CHUNK_TOKENS = 64


@struct.dataclass
class ExpertWeights:
  """SwiGLU weights of a table of experts; leading dims `[...]` vary.

  `[L, E]` for a model's full expert set, `[E]` for one layer, `[S]` or
  `[L, S]` for slot pools. bf16 tables may be stored as raw `uint16` bits
  (host banks and slots); `as_dtype` bitcasts them at the gather.

  Attributes:
    gate: `[..., D, F]` gate projection.
    up: `[..., D, F]` up projection.
    down: `[..., F, D]` down projection.
  """
  gate: jax.Array
  up: jax.Array
  down: jax.Array

  def layer(self, index) -> "ExpertWeights":
    return jax.tree.map(lambda w: w[index], self)


def as_dtype(w: jax.Array, dtype) -> jax.Array:
  """Reads a weight stored as raw bf16 bits (`uint16`) or as numbers."""
  if w.dtype == jnp.uint16:
    w = jax.lax.bitcast_convert_type(w, jnp.bfloat16)
  return w.astype(dtype)


def route(router_logits: jax.Array, top_k: int, norm_topk_prob: bool,
          dtype) -> tuple[jax.Array, jax.Array]:
  """Softmax router then top-k, with or without renormalisation.

  Args:
    router_logits: `[N, E]` router scores.
    top_k: K.
    norm_topk_prob: divide the K kept probabilities by their sum (Mixtral,
      Qwen3-MoE) or keep them as they are (OLMoE, Qwen1.5-MoE).
    dtype: dtype of the returned gate weights.

  Returns:
    ids `[N, K]` int32 (descending score) and gate weights `[N, K]`.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  # [N, K]
  weights, ids = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return ids.astype(jnp.int32), weights.astype(dtype)


def expert_ffn(x: jax.Array, table: ExpertWeights,
               rows: jax.Array) -> jax.Array:
  """Runs each token through the K experts found at `rows` of `table`.

  Args:
    x: `[N, D]` tokens.
    table: expert weights with leading dim `[R]`.
    rows: `[N, K]` int32 row of `table` holding each chosen expert.

  Returns:
    `[N, K, D]` expert outputs, in the dtype of `x`.
  """
  n, d = x.shape
  k = rows.shape[1]
  chunk = min(n, CHUNK_TOKENS)
  pad = -n % chunk
  x_chunks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  row_chunks = jnp.pad(rows, ((0, pad), (0, 0))).reshape(-1, chunk, k)

  def one_chunk(args):
    xc, rc = args
    # [C, K, D, F]
    w_gate = as_dtype(table.gate[rc], x.dtype)
    w_up = as_dtype(table.up[rc], x.dtype)
    # [C, K, F, D]
    w_down = as_dtype(table.down[rc], x.dtype)
    # [C, K, F]
    h = jax.nn.silu(jnp.einsum("cd,ckdf->ckf", xc, w_gate)) * jnp.einsum(
        "cd,ckdf->ckf", xc, w_up)
    # [C, K, D]
    return jnp.einsum("ckf,ckfd->ckd", h, w_down)

  out = jax.lax.map(one_chunk, (x_chunks, row_chunks))
  return out.reshape(-1, k, d)[:n]


def combine(expert_out: jax.Array, weights: jax.Array) -> jax.Array:
  """Sums the K weighted expert outputs of each token in routing order.

  Args:
    expert_out: `[N, K, D]`.
    weights: `[N, K]` gate weights.

  Returns:
    `[N, D]`.
  """
  y = expert_out[:, 0] * weights[:, 0, None]
  for j in range(1, expert_out.shape[1]):
    y = y + expert_out[:, j] * weights[:, j, None]
  return y
