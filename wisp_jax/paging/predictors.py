"""Routing predictors for prefetch, optax-style: a state pytree plus pure
`init`/`update`/`predict` functions, used the same way live (inside the
jitted step) and in trace replay (`wisp_jax.sim.prefetch`).

A predictor keeps state for ONE layer (the pager stacks or vmaps it over
layers) and scores the experts of its *target*: the next layer of the same
step (`next_layer`) or the same layer at the next step (`next_step`).

  cooccur   P(expert f at layer l+1 | experts at layer l), learned online
            from the step's needed sets: counts[e, f] / seen[e].
  temporal  P(expert f at step t+1 | experts at step t), per layer, learned
            the same way from consecutive steps.
  gate      mixtral-offloading's speculative gate: layer l+1's router
            applied to layer l's post-attention hidden state (the input of
            layer l's experts); the score of f is the number of the step's
            tokens whose top-k of that lookahead includes f. Live only (it
            needs hidden states); generate records it into the routing
            trace (`RoutingTrace.lookahead_ids`) so replay can use it.
  oracle    the true next-layer set, optionally perturbed (trace replay
            only, like Belady's MIN): the bound, and a knob on accuracy.

Scores are int32 (probabilities in units of 1/`PROB_ONE`), so live and
replay rank experts alike. The predicted set is the top-m positive scores
(`wisp_jax.paging.pager.top_set`).

Wiring (what `update` and `predict` are given, per layer l and step t):

  predictor  update(state_l, source, needed)      predict(state, given)
  cooccur    source = needed[t, l-1] (none at l=0) state_{l+1}, needed[t, l]
  temporal   source = needed[t-1, l]               state_l, needed[t, l]
  gate       -                                     given = lookahead counts
  oracle     -                                     given = needed[t, l+1]
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PROB_ONE = 1024
# A source expert's counts are halved once it has been seen this often, so
# the estimate keeps adapting and counts x PROB_ONE stays inside int32.
MAX_SEEN = 2**15
TARGETS = ("next_layer", "next_step")
INPUTS = ("needed", "lookahead", "future")


class Predictor(NamedTuple):
  """A routing predictor for one layer.

  Attributes:
    name: registry name.
    target: "next_layer" or "next_step" (which set it predicts).
    given: what `predict` reads: "needed" (a step's needed set, see the
      module docstring), "lookahead" (the gate lookahead's per-expert token
      counts) or "future" (the true next set: replay only).
    init: `num_experts -> state`, a NamedTuple of numpy arrays.
    update: `(state, source [E] bool, needed [E] bool) -> state`.
    predict: `(state, given [E] int32) -> scores [E] int32`.
    learns: whether `update` changes the state.
  """
  name: str
  target: str
  given: str
  init: Callable[[int], Any]
  update: Callable[..., Any]
  predict: Callable[..., jax.Array]
  learns: bool = True


class EmptyState(NamedTuple):
  """State of a predictor that learns nothing (`gate`, `oracle`)."""


class TransitionState(NamedTuple):
  """`cooccur` and `temporal`.

  Attributes:
    counts: `[E, E]` int32, `[e, f]` steps in which e was in the source set
      and f in the layer's needed set.
    seen: `[E]` int32 steps in which e was in the source set.
  """
  counts: Any
  seen: Any


def _transition_init(num_experts: int) -> TransitionState:
  return TransitionState(np.zeros((num_experts, num_experts), np.int32),
                         np.zeros((num_experts,), np.int32))


def _transition_update(state: TransitionState, source, needed
                       ) -> TransitionState:
  counts = state.counts + (source[:, None] & needed[None, :]).astype(
      jnp.int32)
  seen = state.seen + source.astype(jnp.int32)
  full = seen >= MAX_SEEN
  return TransitionState(jnp.where(full[:, None], counts >> 1, counts),
                         jnp.where(full, seen >> 1, seen))


def transition_probs(state: TransitionState) -> jax.Array:
  """`[E, E]` int32 P(f | e) in units of 1/PROB_ONE (0 for unseen e)."""
  return (state.counts * PROB_ONE) // jnp.maximum(state.seen, 1)[:, None]


def _transition_predict(state: TransitionState, given) -> jax.Array:
  # Expected number of the given experts that lead to each f.
  return jnp.sum(jnp.where(given[:, None] > 0, transition_probs(state), 0),
                 axis=0, dtype=jnp.int32)


def _no_update(state, source, needed):
  del source, needed
  return state


def _identity(state, given):
  del state
  return jnp.maximum(given, 0).astype(jnp.int32)


def cooccur() -> Predictor:
  """Cross-layer co-occurrence: layer l's needed set predicts layer l+1's."""
  return Predictor("cooccur", "next_layer", "needed", _transition_init,
                   _transition_update, _transition_predict)


def temporal() -> Predictor:
  """Temporal transitions: a layer's needed set at step t predicts its set
  at step t+1."""
  return Predictor("temporal", "next_step", "needed", _transition_init,
                   _transition_update, _transition_predict)


def gate() -> Predictor:
  """The next layer's router on this layer's hidden state (see module)."""
  return Predictor("gate", "next_layer", "lookahead",
                   lambda e: EmptyState(), _no_update, _identity,
                   learns=False)


def oracle() -> Predictor:
  """The true next-layer set (trace replay only)."""
  return Predictor("oracle", "next_layer", "future",
                   lambda e: EmptyState(), _no_update, _identity,
                   learns=False)


_REGISTRY = {"cooccur": cooccur, "temporal": temporal, "gate": gate,
             "oracle": oracle}
PREDICTORS = tuple(_REGISTRY)
LIVE_PREDICTORS = ("cooccur", "temporal", "gate")


def get_predictor(name: str) -> Predictor:
  """The predictor `name` (one of `PREDICTORS`)."""
  try:
    return _REGISTRY[name]()
  except KeyError:
    raise ValueError(f"Unknown predictor {name!r}; known predictors: "
                     f"{', '.join(_REGISTRY)}.") from None


def lookahead_counts(ids: jax.Array, num_experts: int) -> jax.Array:
  """`[E]` int32 tokens whose lookahead top-k `ids` `[N, K]` include each
  expert (-1 ids, no prediction, are skipped)."""
  flat = ids.reshape(-1)
  return jnp.zeros((num_experts,), jnp.int32).at[
      jnp.where(flat >= 0, flat, num_experts)].add(1, mode="drop")


def precision_recall(predicted: np.ndarray, actual: np.ndarray
                     ) -> tuple[float, float]:
  """Precision and recall of predicted sets against actual ones, pooled.

  Args:
    predicted: `[..., E]` bool predicted sets.
    actual: `[..., E]` bool true sets (same shape).

  Returns:
    (|P & A| / |P|, |P & A| / |A|), summed over all sets (1.0 when a
    denominator is 0).
  """
  both = int(np.sum(predicted & actual))
  p, a = int(np.sum(predicted)), int(np.sum(actual))
  return (both / p if p else 1.0), (both / a if a else 1.0)
