"""Seeded synthetic routing traces with controlled locality.

Every generator draws, for each of `num_requests` requests, a sequence of
`tokens_per_request` tokens, each with K distinct experts per layer and
descending gate weights (a flat Dirichlet, sorted). Requests run in waves
of `batch`: wave w holds requests [w*batch, (w+1)*batch) and its t-th
step carries token t of each of them, so a step has up to `batch` events
and the trace has ceil(num_requests / batch) * tokens_per_request steps,
all in the decode phase.

  uniform      no locality: K experts uniformly, without replacement.
  zipf         popularity p(rank r) ~ r^-alpha; layer l maps ranks to
               experts through its own random permutation.
  sticky       temporal locality: a token keeps each of its request's
               previous-token experts (same layer) with probability
               p_keep, and fills the rest from the popularity.
  cross_layer  layer l+1 keeps each expert that a fixed random permutation
               maps from layer l's experts with probability p_follow, and
               fills the rest from the popularity.

Sampling without replacement in proportion to p uses the Gumbel top-k
trick: the K largest log p + Gumbel noise; forced experts get +inf.
"""

from __future__ import annotations

import numpy as np

from wisp_jax.traces.trace import DECODE, RoutingTrace


def _check(num_layers: int, num_experts: int, top_k: int,
           num_requests: int, tokens_per_request: int, batch: int,
           **probabilities: float) -> None:
  sizes = dict(num_layers=num_layers, num_experts=num_experts, top_k=top_k,
               num_requests=num_requests,
               tokens_per_request=tokens_per_request, batch=batch)
  for name, value in sizes.items():
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if top_k > num_experts:
    raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; "
                     "a token needs top_k distinct experts.")
  for name, value in probabilities.items():
    if name == "alpha":
      if value < 0:
        raise ValueError(f"alpha must be >= 0 (0 is uniform), got {value}.")
    elif not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} is a probability in [0, 1], got {value}.")


def popularity(rng: np.random.Generator, num_layers: int, num_experts: int,
               alpha: float) -> np.ndarray:
  """`[L, E]` log-probabilities: Zipf(alpha) over a per-layer permutation."""
  ranks = np.arange(1, num_experts + 1, dtype=np.float64)
  log_p = -alpha * np.log(ranks)
  log_p -= np.log(np.exp(log_p).sum())
  perms = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])
  out = np.empty((num_layers, num_experts))
  out[np.arange(num_layers)[:, None], perms] = log_p[None, :]
  return out


def _draw(rng: np.random.Generator, log_p: np.ndarray, top_k: int,
          forced: np.ndarray | None = None) -> np.ndarray:
  """K distinct experts per row of `log_p` `[..., E]`, `forced` ones first.

  Args:
    rng: random generator.
    log_p: `[..., E]` log-probabilities (broadcast against the output).
    top_k: K.
    forced: `[..., E]` bool of experts that must be chosen (at most K).

  Returns:
    `[..., K]` int64 expert ids.
  """
  shape = log_p.shape if forced is None else np.broadcast_shapes(
      log_p.shape, forced.shape)
  scores = log_p + rng.gumbel(size=shape)
  if forced is not None:
    scores = np.where(forced, np.inf, scores)
  return np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]


def _gate_weights(rng: np.random.Generator, shape: tuple[int, ...]
                  ) -> np.ndarray:
  """Flat-Dirichlet weights over the last axis, sorted descending."""
  g = rng.gamma(1.0, size=shape)
  return -np.sort(-(g / g.sum(axis=-1, keepdims=True)), axis=-1)


def _assemble(ids: np.ndarray, weights: np.ndarray, num_experts: int,
              batch: int, kind: str, params: str) -> RoutingTrace:
  """Lays `[R, T, L, K]` per-request tokens out in waves of `batch`."""
  num_requests, tokens = ids.shape[:2]
  request = np.arange(num_requests)
  wave = request // batch
  # [R, T] step of token t of request r; events sorted by (step, request).
  step = wave[:, None] * tokens + np.arange(tokens)[None, :]
  order = np.lexsort((np.broadcast_to(request[:, None], step.shape).ravel(),
                      step.ravel()))
  r_idx, t_idx = np.unravel_index(order, step.shape)
  return RoutingTrace(
      step=step[r_idx, t_idx], request=r_idx, phase=np.full(r_idx.size,
                                                           DECODE),
      position=t_idx, ids=ids[r_idx, t_idx],
      weights=weights[r_idx, t_idx], num_experts=num_experts,
      model="synthetic", source=f"synthetic.{kind}({params})")


def uniform(num_layers: int, num_experts: int, top_k: int,
            num_requests: int, tokens_per_request: int, batch: int, *,
            seed: int = 0) -> RoutingTrace:
  """No locality: every token draws K distinct experts uniformly.

  Args:
    num_layers: L.
    num_experts: E.
    top_k: K.
    num_requests: requests in the trace.
    tokens_per_request: tokens each request routes.
    batch: requests served together (events per step).
    seed: same seed, same trace.

  Returns:
    the trace.
  """
  _check(num_layers, num_experts, top_k, num_requests, tokens_per_request,
         batch)
  rng = np.random.default_rng(seed)
  shape = (num_requests, tokens_per_request, num_layers)
  ids = _draw(rng, np.zeros(shape + (num_experts,)), top_k)
  return _assemble(ids, _gate_weights(rng, shape + (top_k,)), num_experts,
                   batch, "uniform", f"seed={seed}")


def zipf(num_layers: int, num_experts: int, top_k: int, num_requests: int,
         tokens_per_request: int, batch: int, *, alpha: float = 1.0,
         seed: int = 0) -> RoutingTrace:
  """Skewed popularity, no temporal locality.

  Args are those of `uniform`, plus:
    alpha: Zipf exponent of expert popularity (0: uniform).

  Returns:
    the trace.
  """
  _check(num_layers, num_experts, top_k, num_requests, tokens_per_request,
         batch, alpha=alpha)
  rng = np.random.default_rng(seed)
  log_p = popularity(rng, num_layers, num_experts, alpha)
  shape = (num_requests, tokens_per_request, num_layers)
  ids = _draw(rng, np.broadcast_to(log_p, shape + (num_experts,)), top_k)
  return _assemble(ids, _gate_weights(rng, shape + (top_k,)), num_experts,
                   batch, "zipf", f"alpha={alpha}, seed={seed}")


def sticky(num_layers: int, num_experts: int, top_k: int, num_requests: int,
           tokens_per_request: int, batch: int, *, p_keep: float = 0.8,
           alpha: float = 0.0, seed: int = 0) -> RoutingTrace:
  """Markov temporal locality per layer.

  Token t of a request keeps each expert of its token t-1 (same layer)
  independently with probability `p_keep`; the remaining slots are drawn
  from the Zipf(`alpha`) popularity, distinct from the kept experts.

  Args are those of `uniform`, plus:
    p_keep: probability of keeping each previous expert.
    alpha: popularity exponent of fresh draws (0: uniform).

  Returns:
    the trace.
  """
  _check(num_layers, num_experts, top_k, num_requests, tokens_per_request,
         batch, p_keep=p_keep, alpha=alpha)
  rng = np.random.default_rng(seed)
  log_p = popularity(rng, num_layers, num_experts, alpha)
  shape = (num_requests, num_layers)
  ids = np.empty((num_requests, tokens_per_request, num_layers, top_k),
                 np.int64)
  ids[:, 0] = _draw(rng, np.broadcast_to(log_p, shape + (num_experts,)),
                    top_k)
  for t in range(1, tokens_per_request):
    keep = rng.random(shape + (top_k,)) < p_keep
    forced = np.zeros(shape + (num_experts,), bool)
    r, l, k = np.nonzero(keep)
    forced[r, l, ids[:, t - 1][r, l, k]] = True
    ids[:, t] = _draw(rng, log_p, top_k, forced)
  weights = _gate_weights(rng, ids.shape)
  return _assemble(ids, weights, num_experts, batch, "sticky",
                   f"p_keep={p_keep}, alpha={alpha}, seed={seed}")


def cross_layer(num_layers: int, num_experts: int, top_k: int,
                num_requests: int, tokens_per_request: int, batch: int, *,
                p_follow: float = 0.8, alpha: float = 0.0,
                seed: int = 0) -> RoutingTrace:
  """Layer l+1's experts follow layer l's through a fixed random map.

  A random permutation `maps[l]` of the experts is drawn per layer pair;
  a token at layer l+1 keeps `maps[l][e]` for each of its layer-l experts
  e independently with probability `p_follow`, and fills the rest from
  the Zipf(`alpha`) popularity. No temporal locality across tokens.

  Args are those of `uniform`, plus:
    p_follow: probability of following each mapped expert.
    alpha: popularity exponent of fresh draws (0: uniform).

  Returns:
    the trace.
  """
  _check(num_layers, num_experts, top_k, num_requests, tokens_per_request,
         batch, p_follow=p_follow, alpha=alpha)
  rng = np.random.default_rng(seed)
  log_p = popularity(rng, num_layers, num_experts, alpha)
  maps = np.stack([rng.permutation(num_experts)
                   for _ in range(num_layers - 1)] or
                  [np.arange(num_experts)])
  shape = (num_requests, tokens_per_request)
  ids = np.empty(shape + (num_layers, top_k), np.int64)
  ids[:, :, 0] = _draw(rng, np.broadcast_to(log_p[0], shape + (num_experts,)),
                       top_k)
  for l in range(1, num_layers):
    follow = rng.random(shape + (top_k,)) < p_follow
    forced = np.zeros(shape + (num_experts,), bool)
    r, t, k = np.nonzero(follow)
    forced[r, t, maps[l - 1][ids[:, :, l - 1][r, t, k]]] = True
    ids[:, :, l] = _draw(rng, log_p[l], top_k, forced)
  weights = _gate_weights(rng, ids.shape)
  return _assemble(ids, weights, num_experts, batch, "cross_layer",
                   f"p_follow={p_follow}, alpha={alpha}, seed={seed}")
