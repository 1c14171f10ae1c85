"""Routing, expert computation and combine: module-level pure functions.

Shape legend (used across wisp_jax): B batch, T time, D model, F expert ffn,
E experts, K top-k, L layers, S slots, H heads, N tokens (B*T flattened),
M routed pairs (N*K), R rows of an expert table (E for a resident layer, S
for a slot pool), P pairs per block of the grouped expert product.

Exactness rule (every expert source obeys it; read it before adding one):

1. Every source computes its experts with `expert_ffn`, on the same tokens
   and the same weight *bits*; the sources differ only in which table
   (resident experts, slots, a scratch copy of the host bank) and which
   rows they hand to it.
2. `expert_ffn` computes each routed (token, k) pair in a block of `P`
   pairs of one expert, `[P, D] @ [D, F]`, and the pair's place in its
   block depends only on the routing (pairs of one expert, in token order),
   never on where the expert's weights sit. `P` depends on static shapes
   (N, K, E) alone. So a pair's output has the same bits in every source.
3. The outputs leave `expert_ffn` through a loop (a `while` over blocks),
   and only from there reach `combine`. XLA cannot fuse across a loop
   boundary, so the kernel that sums the K outputs (`combine`, the residual
   add) is compiled from the same operands in every source. Never hand
   expert outputs to `combine` through elementwise post-processing (a
   `jnp.where` merge of two calls) in straight-line code: XLA:CPU fuses it
   into the consumer, marks the reductions there reassociable and LLVM
   contracts multiply-adds into FMAs, so the rounding would then depend on
   what else got fused. (`lax.optimization_barrier` does not help on CPU: it
   is removed before fusion.)
4. `combine` sums the K outputs in routing order, never in slot or
   expert-id order.

Tests check the rule as outcomes, `np.array_equal` of logits, under several
`XLA_FLAGS=--xla_cpu_max_isa=` values (each is another CPU's code
generation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Largest block of the grouped expert product: bounds the activation
# working set to P x F per block whatever the prefill length.
MAX_BLOCK = 64


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


def as_bits(w: jax.Array) -> jax.Array:
  """How banks and slots store a weight: bf16 as its raw `uint16` bits.

  Expert tables handed to `expert_ffn` should be stored so: given a bf16
  table, XLA:CPU converts the whole table to f32 outside the block loop (a
  temporary twice the table's size); from `uint16` bits it converts one
  sliced expert at a time.
  """
  if w.dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(w, jnp.uint16)
  return w


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


def block_pairs(num_tokens: int, top_k: int, num_experts: int) -> int:
  """P: the mean pairs per expert, rounded up to a power of two, in
  [1, MAX_BLOCK]. At decode (N = 1) P = 1: one matrix-vector product per
  routed expert, nothing wasted."""
  mean = -(-num_tokens * top_k // num_experts)
  return min(1 << max(mean - 1, 0).bit_length(), MAX_BLOCK)


def _expert_rows(table: ExpertWeights, layer, row) -> ExpertWeights:
  """The `[D, F]` / `[F, D]` weights of one table row, sliced in place (no
  copy of the table)."""

  def take(w):
    if layer is None:
      return jax.lax.dynamic_index_in_dim(w, row, keepdims=False)
    start = (layer, row) + (0,) * (w.ndim - 2)
    return jax.lax.dynamic_slice(w, start, (1, 1) + w.shape[2:])[0, 0]

  return jax.tree.map(take, table)


def expert_ffn(x: jax.Array, table: ExpertWeights, rows: jax.Array, *,
               num_experts: int, layer=None, out: jax.Array | None = None,
               select: jax.Array | None = None) -> jax.Array:
  """Runs each routed (token, k) pair through the expert at its table row.

  A grouped product without per-token weight copies: the pairs are sorted
  by row and cut into blocks of `P` pairs of one row; each block gathers its
  tokens `[P, D]` and multiplies them by the row's weights, sliced from the
  table in place. See the module docstring for why this is exact across
  sources.

  Args:
    x: `[N, D]` tokens.
    table: expert weights, leading dims `[R]` or `[L, R]`.
    rows: `[N, K]` int32 row of `table` holding each chosen expert.
    num_experts: E of the model (sets `P`; the same in every source).
    layer: index into the leading `[L]` of `table`, or None for `[R]`.
    out: `[N, K, D]` outputs to update (default zeros).
    select: `[N, K]` bool, the pairs to compute (default all); the others
      keep their value in `out`.

  Returns:
    `[N, K, D]` expert outputs, in the dtype of `x`.
  """
  n, d = x.shape
  k = rows.shape[1]
  m = n * k
  num_rows = table.gate.shape[0 if layer is None else 1]
  p = block_pairs(n, k, num_experts)
  max_blocks = m // p + min(num_rows, m)
  # Unselected pairs get key R and sort last.
  valid = (jnp.ones((m,), bool) if select is None else
           select.reshape(-1))
  key = jnp.where(valid, rows.reshape(-1), num_rows)
  # [M] pair ids by row, pairs of a row in token order.
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sorted_key = key[order]
  row = jnp.minimum(sorted_key, num_rows - 1)
  # [R] pairs and blocks of each row.
  count = jnp.zeros((num_rows + 1,), jnp.int32).at[key].add(1)[:num_rows]
  blocks = (count + p - 1) // p
  first_block = jnp.cumsum(blocks) - blocks
  first_pair = jnp.cumsum(count) - count
  # [M] rank of each sorted pair among its row's pairs.
  rank = jnp.arange(m, dtype=jnp.int32) - first_pair[row]
  block = jnp.where(sorted_key < num_rows, first_block[row] + rank // p,
                    max_blocks)
  # [max_blocks, P] pair ids of each block (M for an empty place) and
  # [max_blocks] table row of each block.
  pair_of = jnp.full((max_blocks, p), m, jnp.int32).at[block, rank % p].set(
      order, mode="drop")
  row_of = jnp.zeros((max_blocks,), jnp.int32).at[block].set(row, mode="drop")
  num_blocks = jnp.sum(blocks)
  flat = (jnp.zeros((m, d), x.dtype) if out is None else
          out.reshape(m, d).astype(x.dtype))

  def one_block(b, flat):
    pairs = pair_of[b]
    # [P, D]
    xb = x[jnp.minimum(pairs // k, n - 1)]
    w = _expert_rows(table, layer, row_of[b])
    # [P, F] = [P, D] @ [D, F]
    h = jax.nn.silu(xb @ as_dtype(w.gate, x.dtype)) * (
        xb @ as_dtype(w.up, x.dtype))
    # [P, D] = [P, F] @ [F, D]
    y = h @ as_dtype(w.down, x.dtype)
    return flat.at[pairs].set(y, mode="drop")

  flat = jax.lax.fori_loop(0, num_blocks, one_block, flat)
  return flat.reshape(n, k, d)


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
