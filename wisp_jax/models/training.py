"""Trains the byte-level MoE model on the stdlib corpus.

Training uses a *dense-dispatch* forward: the decoder's own layer body
(`Decoder.forward`) with an expert source that runs every token through all
E experts of a layer as wide matmuls and keeps the outputs of its K routed
experts. On a CPU this is much faster than the grouped inference product,
it is differentiable, and it gives the logits of `MoEModel.__call__` to
float rounding (tested to ~1e-5): routing, attention, norms and combine are
the model's own code.

Shape legend as in `wisp_jax.models.moe`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig, get_config
from wisp_jax.models.experts import ResidentSource
from wisp_jax.models.transformer import Decoder, MoEModel

# A uniform guess over 256 byte values costs 8 bits per byte.
UNIFORM_BITS_PER_BYTE = 8.0


def model_config(config: ml_collections.ConfigDict) -> MoEConfig:
  """The `MoEConfig` named by `config.model.preset` with its overrides."""
  overrides = config.model.get("overrides")
  overrides = overrides.to_dict() if overrides else {}
  return get_config(config.model.preset).replace(**overrides)


class DenseDispatchSource:
  """Training's expert source: every token through all E experts of a
  layer (wide batched matmuls, fast on a CPU and differentiable), then the
  outputs of its K routed experts picked out. Same layer body as inference;
  logits equal `MoEModel.__call__`'s to float rounding (~1e-6), not bit
  for bit."""

  def __init__(self, experts: moe.ExpertWeights):
    self.experts = experts  # [L, E, ...]

  def layer(self, layer, x, ids, carry):
    w = self.experts.layer(layer)
    # [N, E, F]
    hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x, w.gate)) * jnp.einsum(
        "nd,edf->nef", x, w.up)
    # [N, E, D]
    every = jnp.einsum("nef,efd->ned", hidden, w.down)
    # [N, K, D]
    return jnp.take_along_axis(every, ids[:, :, None], axis=1), carry

  def end_step(self, carry):
    return carry


def dense_forward(decoder: Decoder, experts: moe.ExpertWeights,
                  tokens: jax.Array) -> tuple[jax.Array, jax.Array,
                                              jax.Array]:
  """Causal forward with dense expert dispatch (training only).

  Runs the decoder's own layer body (`Decoder.forward`) with a
  `DenseDispatchSource`; the layer loop is a `fori_loop` with a static trip
  count, which JAX differentiates as a scan.

  Args:
    decoder: the dense part of the model.
    experts: `[L, E, ...]` routed expert weights.
    tokens: `[B, T]` int32.

  Returns:
    logits `[B, T, V]`, router probabilities `[L, N, E]` (float32) and
    the top-k expert ids `[L, N, K]`, for the load-balancing loss.
  """
  out = decoder.forward(tokens, None, None, DenseDispatchSource(experts),
                        router_probs=True)
  num_layers = out.routing_ids.shape[0]
  return (out.logits, out.router_probs,
          out.routing_ids.reshape(num_layers, -1, out.routing_ids.shape[-1]))


def load_balancing_loss(probs: jax.Array, ids: jax.Array) -> jax.Array:
  """Switch-Transformer auxiliary loss, averaged over layers.

  `E * sum_e f_e * P_e`, where f_e is the share of the N*K routing slots
  sent to expert e and P_e its mean router probability; 1 when balanced.

  Args:
    probs: `[L, N, E]` router probabilities.
    ids: `[L, N, K]` top-k ids.
  """
  e = probs.shape[-1]
  # [L, E]
  share = jnp.mean(jax.nn.one_hot(ids, e, dtype=jnp.float32), axis=(1, 2))
  mean_prob = jnp.mean(probs, axis=1)
  return e * jnp.mean(jnp.sum(share * mean_prob, axis=-1))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-byte cross-entropy in nats; logits `[B, T, V]`."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, targets))


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay; no decay on norm vectors."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.num_steps,
      end_value=config.learning_rate * config.final_lr_fraction)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.95,
                  weight_decay=config.weight_decay, mask=decay_mask))


def make_train_step(graphdef: nnx.GraphDef, optimizer:
                    optax.GradientTransformation, aux_weight: float):
  """Jitted `(params, opt_state, batch [B, T+1]) -> params, opt_state, m`."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits, probs, ids = dense_forward(model.decoder, model.experts.weights(),
                                       batch[:, :-1])
    ce = cross_entropy(logits, batch[:, 1:])
    aux = load_balancing_loss(probs, ids)
    return ce + aux_weight * aux, (ce, aux)

  @jax.jit
  def step(params, opt_state, batch):
    grads, (ce, aux) = jax.grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": ce, "aux_loss": aux,
               "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, metrics

  return step


def evaluate(model: MoEModel, windows: np.ndarray, batch_size: int
             ) -> dict[str, Any]:
  """Validation bits/byte and expert usage with the inference forward.

  Runs `Decoder.forward` with a `ResidentSource` (what `MoEModel.__call__`
  runs), so the routing counted is the routing served.

  Args:
    model: the model.
    windows: `[W, T + 1]` int32 held-out windows.
    batch_size: windows per forward pass.

  Returns:
    bits per byte, per-layer usage entropy (bits) and expert counts.
  """
  graphdef, state = nnx.split(model.decoder)
  experts = model.experts.weights()
  c = model.config

  @jax.jit
  def eval_batch(state, experts, batch):
    decoder = nnx.merge(graphdef, state)
    inputs = batch[:, :-1]
    out = decoder.forward(inputs, None, None, ResidentSource(experts))
    ids = out.routing_ids
    nll = optax.softmax_cross_entropy_with_integer_labels(
        out.logits.astype(jnp.float32), batch[:, 1:])
    # [L, E]
    counts = jnp.sum(jax.nn.one_hot(ids, c.num_experts, dtype=jnp.int32),
                     axis=(1, 2, 3))
    return jnp.sum(nll), counts

  total_nll, total_bytes = 0.0, 0
  counts = np.zeros((c.num_layers, c.num_experts), np.int64)
  # Whole batches only: one compiled shape.
  usable = (len(windows) // batch_size) * batch_size
  if usable == 0:
    raise ValueError(f"{len(windows)} eval windows make no batch of "
                     f"{batch_size}.")
  for start in range(0, usable, batch_size):
    batch = jnp.asarray(windows[start:start + batch_size])
    nll, layer_counts = eval_batch(state, experts, batch)
    total_nll += float(nll)
    total_bytes += batch.shape[0] * (batch.shape[1] - 1)
    counts += np.asarray(layer_counts)
  share = counts / counts.sum(axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    entropy = -np.sum(np.where(share > 0, share * np.log2(share), 0.0), axis=1)
  return {
      "val_bits_per_byte": total_nll / total_bytes / math.log(2),
      "val_bytes": total_bytes,
      "expert_entropy_bits": [float(h) for h in entropy],
      "max_entropy_bits": math.log2(c.num_experts),
      "expert_counts": counts.tolist(),
  }
