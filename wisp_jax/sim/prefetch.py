"""Trace replay with prefetch: the live pager's planning and predictors.

`replay` runs a routing trace through `wisp_jax.paging.pager.page_layer`
(demand) and `pager.prefetch_layer` (prefetch), with a predictor of
`wisp_jax.paging.predictors`, in the order the live paged source runs them
for every layer l of a step t:

  1. next-layer prefetch into l (predicted at layer l-1 of step t: cooccur,
     gate, oracle; none at layer 0);
  2. demand paging of l's needed set (the gate-weight policy gets the
     step's gate mass from the trace's weights);
  3. the predictor learns (cooccur: l-1 -> l at t; temporal: t-1 -> t);
  4. next-step prefetch into l (temporal), protecting l's needed set.

Each layer's inputs are known from the trace in advance, so the layers run
side by side (`jax.vmap`), one jitted `lax.scan` over steps, as in
`wisp_jax.sim.replay` (whose module docstring defines steps, batching and
the MIN hint; this module calls its helpers and leaves it unchanged).

Predictors here: `cooccur`, `temporal`, `gate` (needs a trace recorded with
`lookahead_ids`) and `oracle` (the true next-layer set, each expert kept
with probability `accuracy` and otherwise swapped for a random wrong one:
replay only). Recall and precision of every prediction are measured in
the same pass, at the prefetch size and at top-K.

The predicted set has `size` experts per layer and step (-1: the live
default, `pager.default_prefetch_size`: the size of the needed set of
the layer that predicts, when below the capacity, else capacity - 1) and
at most
`limit` of them are copied (-1: `size`; 0 measures the predictor without
prefetching).

Shape legend: S steps, L layers, E experts, K top-k.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wisp_jax.paging import pager
from wisp_jax.paging.policies import GATE_ONE, get_policy
from wisp_jax.paging.predictors import get_predictor
from wisp_jax.sim import replay as replay_lib
from wisp_jax.traces.trace import RoutingTrace

# Rows of the per-step output `[S, ROWS, L]`.
ROWS = ("hits", "misses", "loads", "prefetch", "wait", "predicted",
        "correct", "predicted_k", "correct_k", "actual")
_MAX_ELEMENTS = 2**27  # steps x layers x experts replayed at once


@dataclasses.dataclass(frozen=True)
class PrefetchResult:
  """Counts of one replay with prefetch, in experts.

  Attributes:
    policy: the eviction policy's name.
    predictor: the predictor's name ("" for none).
    target: "next_layer", "next_step" or "" (when copies are issued: at the
      routing of layer l-1 of the same step, or after layer l's own demand
      for the next step).
    capacity: `[L]` slots per layer.
    tokens: `[S]` events (tokens) per step.
    step: `[S, ROWS, L]` int32 per step and layer: demand hits, misses and
      loads; prefetch copies into the layer; wait (1 if the layer's expert
      compute uses a prefetch issued in this step for next-layer
      predictors, or in the last step for next-step ones: it waits on that
      copy); the predicted set's size and its correct experts; the same at
      top-K; the true target set's size.
    prefetch_loads: `[L]` int64 prefetch copies.
    useful: `[L]` int64 prefetched experts needed before eviction.
    wasted: `[L]` int64 prefetched experts evicted unused.
  """
  policy: str
  predictor: str
  target: str
  capacity: np.ndarray
  tokens: np.ndarray
  step: np.ndarray
  prefetch_loads: np.ndarray
  useful: np.ndarray
  wasted: np.ndarray

  def row(self, name: str) -> np.ndarray:
    """`[S, L]` int64 of one row of `ROWS`."""
    return self.step[:, ROWS.index(name)].astype(np.int64)

  @property
  def hits(self) -> np.ndarray:
    return self.row("hits").sum(axis=0)

  @property
  def misses(self) -> np.ndarray:
    return self.row("misses").sum(axis=0)

  @property
  def loads(self) -> np.ndarray:
    """`[L]` demand loads (prefetch copies are in `prefetch_loads`)."""
    return self.row("loads").sum(axis=0)

  @property
  def hit_rate(self) -> float:
    total = int(self.hits.sum() + self.misses.sum())
    return float(self.hits.sum()) / total if total else 1.0

  @property
  def copies(self) -> int:
    """All host-to-device copies: demand and prefetch."""
    return int(self.loads.sum() + self.prefetch_loads.sum())

  def _ratio(self, num: str, den: str) -> float:
    n, d = int(self.row(num).sum()), int(self.row(den).sum())
    return n / d if d else 1.0

  @property
  def precision(self) -> float:
    """Correct / predicted at the prefetch size (pooled)."""
    return self._ratio("correct", "predicted")

  @property
  def recall(self) -> float:
    """Correct / true target set at the prefetch size (pooled)."""
    return self._ratio("correct", "actual")

  @property
  def precision_k(self) -> float:
    return self._ratio("correct_k", "predicted_k")

  @property
  def recall_k(self) -> float:
    return self._ratio("correct_k", "actual")


def _noisy_oracle(future: np.ndarray, accuracy: float,
                  rng: np.random.Generator) -> np.ndarray:
  """Each true expert kept with probability `accuracy`, else swapped for a
  random expert outside the true set (the set keeps its size)."""
  if accuracy >= 1:
    return future.astype(np.int32)
  keep = future & (rng.random(future.shape) < accuracy)
  dropped = (future & ~keep).sum(axis=-1)
  noise = np.where(future, -np.inf, rng.random(future.shape))
  order = np.argsort(-noise, axis=-1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(future.shape[-1])[None, None],
                    axis=-1)
  swapped = ~future & (rank < dropped[..., None])
  return (keep | swapped).astype(np.int32)


def _lookahead(trace: RoutingTrace, ordinals: np.ndarray, num_steps: int
               ) -> np.ndarray:
  """`[S, L, E]` int32: tokens of each step whose recorded lookahead for
  layer l (made at l-1) includes e; layer 0 gets nothing."""
  if trace.lookahead_ids is None:
    raise ValueError("predictor 'gate' needs a trace with lookahead_ids: "
                     "record it with generate(..., experts='paged', "
                     "prefetch='gate', record_routing=True) "
                     "(wisp_jax.runs.prefetch.record_lookahead).")
  num_layers, num_experts = trace.num_layers, trace.num_experts
  out = np.zeros((num_steps, num_layers, num_experts), np.int32)
  look = trace.lookahead_ids.astype(np.int64)  # [N, L, K]
  for layer in range(1, num_layers):
    ids = look[:, layer - 1]  # predictions for `layer`
    valid = ids >= 0
    rows = np.broadcast_to(ordinals[:, None], ids.shape)[valid]
    np.add.at(out, (rows, layer, ids[valid]), 1)
  return out


def _gates(trace: RoutingTrace, ordinals: np.ndarray, num_steps: int
           ) -> np.ndarray:
  """`[S, L, E]` int32 gate mass per step (`policies.gate_mass`)."""
  out = np.zeros((num_steps, trace.num_layers, trace.num_experts), np.int32)
  for layer in range(trace.num_layers):
    units = np.round(trace.weights[:, layer].astype(np.float32)
                     * np.float32(GATE_ONE)).astype(np.int32)
    np.maximum.at(out, (np.broadcast_to(ordinals[:, None], units.shape),
                        layer, trace.ids[:, layer]), units)
  return out


def inputs(trace: RoutingTrace, predictor: str, *, batching: str = "trace",
           accuracy: float = 1.0, seed: int = 0, gates: bool = False,
           hints: bool = False) -> dict[str, np.ndarray]:
  """The per-step inputs of a replay (see the module docstring).

  Returns:
    `needed` `[S, L, E]` bool, `source` (what the predictor learns from),
    `given` `[S, L, E]` int32 (what it predicts from), `actual` (the true
    target set), `gates` (if asked), `hint_now` / `hint_after` (MIN, if
    asked), `basis` `[S, L]` int32 (the needed-set size of the layer that
    predicts, for the default prefetch size) and `tokens` `[S]`.
  """
  ordinals = replay_lib.step_ordinals(trace, batching)
  num_steps = int(ordinals[-1]) + 1 if ordinals.size else 0
  needed = replay_lib.needed_masks(trace, batching, ordinals=ordinals)
  none = np.zeros_like(needed)
  before_layer = np.concatenate([none[:, :1], needed[:, :-1]], axis=1)
  before_step = np.concatenate([none[:1], needed[:-1]], axis=0)
  after_step = np.concatenate([needed[1:], none[:1]], axis=0)
  counts = needed.sum(axis=2).astype(np.int32)  # [S, L]
  out = {"needed": needed, "basis": counts,
         "tokens": np.bincount(ordinals, minlength=num_steps)}
  if not predictor:
    out.update(source=none, given=none.astype(np.int32), actual=none)
  elif predictor == "temporal":
    out.update(source=before_step, given=needed.astype(np.int32),
               actual=after_step)
  else:
    given = {"cooccur": lambda: before_layer.astype(np.int32),
             "gate": lambda: _lookahead(trace, ordinals, num_steps),
             "oracle": lambda: _noisy_oracle(
                 needed, accuracy, np.random.default_rng(seed))}
    if predictor not in given:
      get_predictor(predictor)  # raises for an unknown name
      raise ValueError(f"predictor {predictor!r} has no replay inputs.")
    g = given[predictor]()
    g[:, 0] = 0  # no next-layer prediction for layer 0
    actual = needed.copy()
    actual[:, 0] = False
    # Live, the layer that predicts is the one before the target.
    basis = np.concatenate([np.zeros_like(counts[:, :1]), counts[:, :-1]],
                           axis=1)
    out.update(source=before_layer, given=g, actual=actual, basis=basis)
  if gates:
    out["gates"] = _gates(trace, ordinals, num_steps)
  if hints:
    after = replay_lib.next_use_table(needed)
    steps = np.arange(num_steps, dtype=np.int32)[:, None, None]
    out["hint_after"] = after
    out["hint_now"] = np.where(needed, steps, after).astype(np.int32)
  return out


def _kind(predictor: str) -> str:
  """Replays that differ only in their inputs share a compiled scan: no
  prefetch (zero scores), gate and oracle all predict `given` as it is."""
  if predictor in ("", "gate", "oracle"):
    return "oracle"
  get_predictor(predictor)  # raises for an unknown name
  return predictor


@functools.lru_cache(maxsize=None)
def _replay_fn(policy_name: str, options: tuple, kind: str, top_k: int):
  policy = get_policy(policy_name, **dict(options))
  p = get_predictor(kind)
  cross = p.target == "next_layer"
  lag = 0 if cross else 1

  def one_layer(ls, pst, issued, x):
    (layer, tick, needed, source, given, actual, gates, hint_now, hint_after,
     size_opt, limit_opt, basis) = x
    zero = jnp.zeros((), jnp.int32)
    # The live default: from the size of the set the predictor reads (the
    # layer's own needed set live: layer l-1's for next-layer targets).
    size = jnp.where(size_opt < 0,
                     pager.default_prefetch_size(ls.capacity, basis),
                     size_opt)
    limit = jnp.where(limit_opt < 0, size, limit_opt)
    stats = dict(prefetch=zero, predicted=zero, correct=zero,
                 predicted_k=zero, correct_k=zero,
                 actual=jnp.sum(actual, dtype=jnp.int32))

    def measure(scores):
      top = pager.top_set(scores, size, ls.slot_of_expert >= 0)
      top_k_set = pager.top_set(scores, top_k)
      stats.update(predicted=jnp.sum(top, dtype=jnp.int32),
                   correct=jnp.sum(top & actual, dtype=jnp.int32),
                   predicted_k=jnp.sum(top_k_set, dtype=jnp.int32),
                   correct_k=jnp.sum(top_k_set & actual, dtype=jnp.int32))

    def prefetch(ls, issued, scores, protect, limit, hint):
      before = ls.prefetch_loads
      pending = ls.prefetched & (ls.slot_of_expert >= 0)
      ls, _ = pager.prefetch_layer(policy, ls, scores, size, protect, limit,
                                   tick, None, None, hint)
      issued = jnp.where(ls.prefetched & ~pending, tick, issued)
      stats["prefetch"] = ls.prefetch_loads - before
      return ls, issued

    if cross:
      scores = p.predict(pst, given)
      measure(scores)
      ls, issued = prefetch(ls, issued, scores, jnp.zeros_like(needed),
                            jnp.where(layer > 0, limit, 0), hint_now)
    pending = ls.prefetched & (ls.slot_of_expert >= 0)
    wait = jnp.any(pending & needed & (issued == tick - lag))
    before = (ls.hits, ls.misses, ls.loads)
    ls, _ = pager.page_layer(policy, ls, needed, tick, None, None,
                             hint_after if policy.needs_hint else None,
                             gates if policy.uses_gates else None)
    if p.learns:
      pst = p.update(pst, source, needed)
    if not cross:
      scores = p.predict(pst, given)
      measure(scores)
      ls, issued = prefetch(ls, issued, scores, needed, limit, hint_after)
    row = jnp.stack([ls.hits - before[0], ls.misses - before[1],
                     ls.loads - before[2], stats["prefetch"],
                     wait.astype(jnp.int32), stats["predicted"],
                     stats["correct"], stats["predicted_k"],
                     stats["correct_k"], stats["actual"]])
    return ls, pst, issued, row

  every_layer = jax.vmap(one_layer, in_axes=(0, 0, 0, (0, None, 0, 0, 0, 0,
                                                       0, 0, 0, None, None,
                                                       0)))

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def run(ls, pst, issued, xs, layers):
    def body(carry, x):
      ls, pst, issued = carry
      tick, size, limit, basis, *per_layer = x
      needed, source, given, actual, gates, hint_now, hint_after = per_layer
      ls, pst, issued, row = every_layer(
          ls, pst, issued, (layers, tick, needed, source, given, actual,
                            gates, hint_now, hint_after, size, limit, basis))
      return (ls, pst, issued), row.T  # [ROWS, L]

    return jax.lax.scan(body, (ls, pst, issued), xs)

  return policy, p, run


def replay(trace: RoutingTrace, policy: str, capacity, *,
           predictor: str = "", policy_options: Mapping[str, Any] | None = None,
           size: int = -1, limit: int = -1, accuracy: float = 1.0,
           seed: int = 0, batching: str = "trace",
           chunk_steps: int = 256, prepared: dict | None = None
           ) -> PrefetchResult:
  """Replays `trace` with prefetch (see the module docstring).

  Args:
    trace: the routing trace.
    policy: eviction policy (any of `wisp_jax.paging.policies` that evicts,
      `min` and `lrfu_gate` included).
    capacity: slots per layer, int or `[L]`.
    predictor: "", "cooccur", "temporal", "gate" or "oracle".
    policy_options: the policy's options.
    size: predicted set per layer and step (-1: the live default).
    limit: most prefetch copies per layer and step (-1: `size`; 0: measure
      the predictor, copy nothing).
    accuracy: the oracle's probability of keeping each true expert.
    seed: the oracle's noise seed.
    batching: "trace" or "single" (`wisp_jax.sim.replay`).
    chunk_steps: steps per jitted scan call.
    prepared: `inputs(...)` computed already for this trace and predictor.

  Returns:
    the `PrefetchResult`.

  Raises:
    ValueError: bad policy, predictor, capacity or trace.
  """
  options = tuple(sorted((policy_options or {}).items()))
  rule, p, run = _replay_fn(policy, options, _kind(predictor), trace.top_k)
  if not rule.evicts:
    raise ValueError(f"policy {policy!r} never changes its slots; replay it "
                     "with wisp_jax.sim.replay.replay.")
  num_layers, num_experts = trace.num_layers, trace.num_experts
  cap = pager.check_capacity(capacity, num_layers, 1, num_experts,
                             low_why="1", high_why=f"the trace's "
                             f"{num_experts} experts")
  for name, value in (("size", size), ("limit", limit)):
    if int(value) != value or value < -1:
      raise ValueError(f"{name} must be an int >= 0 (or -1), got {value!r}.")
  if not 0 <= accuracy <= 1:
    raise ValueError(f"accuracy must lie in [0, 1], got {accuracy}.")
  x = prepared or inputs(trace, predictor, batching=batching,
                         accuracy=accuracy, seed=seed,
                         gates=rule.uses_gates, hints=rule.needs_hint)
  num_steps = x["needed"].shape[0]
  # A power of two (>= 64) that fits the trace: traces of similar lengths
  # share a compile.
  chunk = int(max(1, min(chunk_steps, _MAX_ELEMENTS
                         // (num_layers * num_experts),
                         max(64, 1 << max(num_steps - 1, 0).bit_length()))))
  state = pager.init_state(rule, num_layers, num_experts, num_experts, cap)
  ls = pager.LayerState(
      slot_of_expert=state.slot_of_expert, expert_in_slot=state.expert_in_slot,
      capacity=state.capacity, policy_state=state.policy_state,
      hits=state.hits, misses=state.misses, loads=state.loads,
      prefetched=state.prefetched, prefetch_loads=state.prefetch_loads,
      useful=state.useful, wasted=state.wasted)
  one = p.init(num_experts)
  pst = jax.tree.map(lambda a: jax.device_put(np.broadcast_to(
      np.asarray(a), (num_layers,) + a.shape).copy()), one)
  issued = jax.device_put(np.full((num_layers, num_experts), -2, np.int32))
  empty = np.zeros((num_steps, num_layers, 0), np.int32)
  per_layer = [x["needed"], x["source"], x["given"], x["actual"],
               x["gates"] if rule.uses_gates else empty,
               x["hint_now"] if rule.needs_hint else empty,
               x["hint_after"] if rule.needs_hint else empty]
  layers = jax.device_put(np.arange(num_layers, dtype=np.int32))
  rows = []
  for start in range(0, num_steps, chunk):
    stop = min(start + chunk, num_steps)
    pad = chunk - (stop - start)

    def piece(a, fill=0):
      a = a[start:stop]
      return np.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1),
                    constant_values=fill) if pad else a

    hint_fill = replay_lib.NEVER_AGAIN
    xs = (np.arange(start, start + chunk, dtype=np.int32),
          np.full(chunk, size, np.int32), np.full(chunk, limit, np.int32),
          piece(x["basis"]),
          *[piece(a, hint_fill if i >= 5 else 0)
            for i, a in enumerate(per_layer)])
    (ls, pst, issued), out = run(ls, pst, issued, jax.device_put(xs), layers)
    rows.append(np.asarray(jax.device_get(out))[:stop - start])
  step = (np.concatenate(rows) if rows else
          np.zeros((0, len(ROWS), num_layers), np.int32))
  ls = jax.device_get(ls)
  return PrefetchResult(
      policy=policy, predictor=predictor,
      target=p.target if predictor else "", capacity=cap.astype(np.int64),
      tokens=x["tokens"].astype(np.int64), step=step,
      prefetch_loads=np.asarray(ls.prefetch_loads, np.int64),
      useful=np.asarray(ls.useful, np.int64),
      wasted=np.asarray(ls.wasted, np.int64))
