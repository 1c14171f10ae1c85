"""`RoutingTrace`: the columnar record of which experts every token used.

One *event* is one token at one forward step; it carries the top-k expert
ids and gate weights of every layer. Columns (N events, L layers, K top-k):

  step      [N] int64   forward-pass index, non-decreasing in N.
  request   [N] int64   request the token belongs to.
  phase     [N] int8    PREFILL (0), DECODE (1) or UNKNOWN (-1, importers
                        whose logs do not say).
  position  [N] int64   token position inside its request (for batched logs
                        with no request identity: the row inside the batch).
  ids       [N, L, K]   int16 (E <= 32767) or int32 expert ids, 0 <= id < E.
  weights   [N, L, K]   float32 gate weights, in the same order as `ids`.

Optional (absent from older files, which load unchanged):

  lookahead_ids [N, L, K] int16/int32 the gate lookahead's prediction for
                          layer l+1 made at layer l (layer l+1's router on
                          layer l's post-attention hidden state), -1 where
                          none was recorded (always at the last layer).

Saved as a compressed `.npz` with a `schema_version`; `load` validates every
field before anything else touches it, and refuses a file it cannot read
(empty, truncated, not an npz, a CRC error in a member) with a `LoadError`
naming the file. The zip CRC of each member makes bit flips in the data
detectable; a flip in zip bookkeeping that numpy does not use (timestamps)
changes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from wisp_jax.errors import LoadError, MissingFileError

SCHEMA_VERSION = 1
PREFILL, DECODE, UNKNOWN = 0, 1, -1
_COLUMNS = ("step", "request", "phase", "position", "ids", "weights")
_OPTIONAL = ("lookahead_ids",)
_METADATA = ("num_experts", "model", "source")


class StepGroup(NamedTuple):
  """The events of one forward step: rows `start:stop` of the trace."""
  step: int
  start: int
  stop: int
  ids: np.ndarray  # [n, L, K]
  weights: np.ndarray  # [n, L, K]
  request: np.ndarray  # [n]
  phase: np.ndarray  # [n]
  position: np.ndarray  # [n]


def id_dtype(num_experts: int) -> np.dtype:
  """Smallest id dtype of the schema that holds `num_experts` ids."""
  return np.dtype(np.int16 if num_experts <= np.iinfo(np.int16).max
                  else np.int32)


def _fail(field: str, problem: str, fix: str = "") -> None:
  raise ValueError(f"RoutingTrace field {field!r}: {problem}"
                   + (f"; {fix}" if fix else "."))


def _check_fields(step, request, phase, position, ids, weights,
                  num_experts, strict: bool = True) -> None:
  """Raises ValueError naming the first field that breaks the schema.

  `strict` demands the stored dtypes (files); otherwise any integer ids and
  any float weights pass, to be cast after the range checks.
  """
  if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
    _fail("num_experts", f"must be a positive int, got {num_experts!r}")
  if ids.ndim != 3:
    _fail("ids", f"must be [N, L, K], got shape {ids.shape}")
  n, num_layers, top_k = ids.shape
  if num_layers < 1 or top_k < 1:
    _fail("ids", f"needs L >= 1 and K >= 1, got shape {ids.shape}")
  if top_k > num_experts:
    _fail("ids", f"top_k={top_k} exceeds num_experts={num_experts}")
  if (ids.dtype not in (np.int16, np.int32) if strict
      else not np.issubdtype(ids.dtype, np.integer)):
    _fail("ids", f"dtype must be int16 or int32, got {ids.dtype}",
          "cast with trace.id_dtype(num_experts)")
  if (weights.dtype != np.float32 if strict else not (
      np.issubdtype(weights.dtype, np.floating)
      or np.issubdtype(weights.dtype, np.integer))):
    _fail("weights", f"dtype must be float32, got {weights.dtype}")
  if weights.shape != ids.shape:
    _fail("weights", f"shape {weights.shape} differs from ids {ids.shape}")
  for name, column in (("step", step), ("request", request),
                       ("phase", phase), ("position", position)):
    if column.shape != (n,):
      _fail(name, f"shape {column.shape} does not match N={n} events")
    if not np.issubdtype(column.dtype, np.integer):
      _fail(name, f"dtype must be an integer type, got {column.dtype}")
  if n == 0:
    return
  low, high = int(ids.min()), int(ids.max())
  if low < 0 or high >= num_experts:
    _fail("ids", f"values must lie in [0, {num_experts}), found "
          f"[{low}, {high}]", "pass the right num_experts")
  if top_k > 1:
    ordered = np.sort(ids, axis=-1)
    if np.any(ordered[..., 1:] == ordered[..., :-1]):
      bad = int(np.argwhere(ordered[..., 1:] == ordered[..., :-1])[0, 0])
      _fail("ids", f"event {bad} repeats an expert inside one top-k")
  if np.any(np.diff(step) < 0):
    bad = int(np.argmax(np.diff(step) < 0)) + 1
    _fail("step", f"must be non-decreasing, but event {bad} has step "
          f"{step[bad]} after {step[bad - 1]}", "sort events by step")
  if not np.all(np.isin(phase, (PREFILL, DECODE, UNKNOWN))):
    _fail("phase", f"values must be 0 (prefill), 1 (decode) or -1 "
          f"(unknown), found {np.unique(phase).tolist()}")
  if not np.all(np.isfinite(weights)):
    _fail("weights", "contains NaN or infinity")


def _check_lookahead(look: np.ndarray, shape: tuple, num_experts: int
                     ) -> None:
  if look.shape != shape:
    _fail("lookahead_ids", f"shape {look.shape} differs from ids {shape}")
  if look.size and not np.issubdtype(look.dtype, np.integer):
    _fail("lookahead_ids", f"dtype must be an integer type, got {look.dtype}")
  if look.size and (int(look.min()) < -1 or int(look.max()) >= num_experts):
    _fail("lookahead_ids", f"values must lie in [-1, {num_experts}), found "
          f"[{int(look.min())}, {int(look.max())}]")


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingTrace:
  """Per-token, per-layer routing of a run; see the module docstring.

  Attributes:
    step: `[N]` int64 forward-pass index, non-decreasing.
    request: `[N]` int64 request id.
    phase: `[N]` int8 PREFILL, DECODE or UNKNOWN.
    position: `[N]` int64 token position in its request.
    ids: `[N, L, K]` int16/int32 expert ids.
    weights: `[N, L, K]` float32 gate weights.
    num_experts: E, routed experts per layer.
    model: model name.
    source: where the trace came from (recorder, importer and file, ...).
    lookahead_ids: `[N, L, K]` recorded gate-lookahead predictions for the
      next layer (-1: none), or None.
  """
  step: np.ndarray
  request: np.ndarray
  phase: np.ndarray
  position: np.ndarray
  ids: np.ndarray
  weights: np.ndarray
  num_experts: int
  model: str = ""
  source: str = ""
  lookahead_ids: np.ndarray | None = None

  def __post_init__(self):
    conv = {"step": np.int64, "request": np.int64, "phase": np.int8,
            "position": np.int64, "ids": np.int64, "weights": np.float32}
    raw = {}
    for name, dtype in conv.items():
      value = np.asarray(getattr(self, name))
      raw[name] = value.astype(dtype) if value.size == 0 else value
    # Check before casting: a cast to int16 would wrap out-of-range ids.
    _check_fields(num_experts=self.num_experts, strict=False, **raw)
    conv["ids"] = id_dtype(self.num_experts)
    for name, dtype in conv.items():
      object.__setattr__(self, name, raw[name].astype(dtype))
    object.__setattr__(self, "num_experts", int(self.num_experts))
    if self.lookahead_ids is not None:
      look = np.asarray(self.lookahead_ids)
      _check_lookahead(look, self.ids.shape, self.num_experts)
      object.__setattr__(self, "lookahead_ids",
                         look.astype(id_dtype(self.num_experts)))

  @property
  def num_tokens(self) -> int:
    """N, the number of (token, step) events."""
    return self.ids.shape[0]

  @property
  def num_layers(self) -> int:
    return self.ids.shape[1]

  @property
  def top_k(self) -> int:
    return self.ids.shape[2]

  @property
  def num_events(self) -> int:
    """Routing decisions recorded: tokens x layers."""
    return self.num_tokens * self.num_layers

  @property
  def num_steps(self) -> int:
    """Distinct forward steps that have at least one event."""
    return int(np.unique(self.step).size)

  def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
    """Distinct step values and the event offsets where each starts/ends."""
    values, starts = np.unique(self.step, return_index=True)
    return values, np.append(starts, self.num_tokens)

  def steps(self) -> Iterator[StepGroup]:
    """Yields one `StepGroup` per distinct step, in step order."""
    values, offsets = self._bounds()
    for i, value in enumerate(values):
      a, b = int(offsets[i]), int(offsets[i + 1])
      yield StepGroup(int(value), a, b, self.ids[a:b], self.weights[a:b],
                      self.request[a:b], self.phase[a:b], self.position[a:b])

  def per_layer_needed(self, step: int) -> list[np.ndarray]:
    """Sorted distinct expert ids each layer needs at `step` (L arrays)."""
    a, b = np.searchsorted(self.step, [step, step + 1])
    if a == b:
      raise ValueError(f"step {step} has no events; steps run from "
                       f"{self.step.min() if self.num_tokens else None} to "
                       f"{self.step.max() if self.num_tokens else None}.")
    return [np.unique(self.ids[a:b, l]).astype(np.int64)
            for l in range(self.num_layers)]

  def needed_masks(self) -> np.ndarray:
    """`[S, L, E]` bool: expert e of layer l is needed at the s-th step.

    S counts distinct step values (in order), so gaps in step numbering
    do not create empty steps.
    """
    _, offsets = self._bounds()
    ordinal = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    masks = np.zeros((offsets.size - 1, self.num_layers, self.num_experts),
                     bool)
    layer = np.arange(self.num_layers)[None, :, None]
    masks[ordinal[:, None, None], layer, self.ids] = True
    return masks

  def select(self, keep: np.ndarray) -> "RoutingTrace":
    """The events picked by a bool mask `[N]` or increasing event indices."""
    keep = np.asarray(keep)
    return dataclasses.replace(
        self, step=self.step[keep], request=self.request[keep],
        phase=self.phase[keep], position=self.position[keep],
        ids=self.ids[keep], weights=self.weights[keep],
        lookahead_ids=(None if self.lookahead_ids is None
                       else self.lookahead_ids[keep]))

  def with_inferred_phases(self) -> tuple["RoutingTrace", int]:
    """Phases filled in where UNKNOWN (imported logs carry none).

    A request with several tokens in one forward step is being prefilled
    there (PREFILL); a request with one token in a step decodes (DECODE).
    A one-token prompt's prefill therefore reads as a decode step, which is
    what it costs.

    Returns:
      the trace and how many events got a phase.
    """
    unknown = self.phase == UNKNOWN
    if not unknown.any():
      return self, 0
    # Tokens of each (step, request) pair, read back for every event.
    _, group, count = np.unique(np.stack([self.step, self.request]), axis=1,
                                return_inverse=True, return_counts=True)
    several = count[group.reshape(-1)] > 1
    phase = np.where(unknown, np.where(several, PREFILL, DECODE),
                     self.phase).astype(self.phase.dtype)
    return dataclasses.replace(self, phase=phase), int(unknown.sum())

  def save(self, path: str | os.PathLike) -> None:
    """Writes a compressed `.npz` (numpy adds the suffix if missing)."""
    np.savez_compressed(
        path, schema_version=np.int64(SCHEMA_VERSION),
        num_experts=np.int64(self.num_experts),
        top_k=np.int64(self.top_k), num_layers=np.int64(self.num_layers),
        model=np.str_(self.model), source=np.str_(self.source),
        **{name: getattr(self, name) for name in _COLUMNS + _OPTIONAL
           if getattr(self, name) is not None})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "RoutingTrace":
    """Reads and validates a trace written by `save`.

    Raises:
      MissingFileError (a FileNotFoundError): if `path` does not exist.
      LoadError (a ValueError): naming the file, the field and what is
        wrong with it, or why the file cannot be read.
    """
    if not os.path.isfile(path):
      raise MissingFileError(f"{path}: no such RoutingTrace file.", file=path)
    try:
      data = np.load(path, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):
        raise LoadError(f"{path}: not a RoutingTrace .npz (it holds one "
                        ".npy array); write traces with RoutingTrace.save.",
                        file=path)
      with data:
        fields = {key: data[key] for key in data.files}
    except LoadError:
      raise
    except Exception as e:  # zip, zlib, npy header and EOF errors alike
      raise LoadError(f"{path}: not a readable RoutingTrace .npz "
                      f"({type(e).__name__}: {e}); the file is empty, "
                      "truncated or corrupt.", file=path) from None
    try:
      return cls._from_fields(fields)
    except ValueError as e:
      raise LoadError(f"{path}: {e}", file=path) from None

  @classmethod
  def _from_fields(cls, fields: dict[str, np.ndarray]) -> "RoutingTrace":
    needed = ("schema_version", "top_k", "num_layers") + _METADATA + _COLUMNS
    missing = [key for key in needed if key not in fields]
    if missing:
      _fail(missing[0], f"missing (missing fields: {missing})",
            "write traces with RoutingTrace.save")
    for name in ("schema_version", "top_k", "num_layers", "num_experts"):
      value = fields[name]
      if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        _fail(name, f"must be one integer, got an array of shape "
              f"{value.shape} and dtype {value.dtype}")
    for name in ("model", "source"):
      value = fields[name]
      if value.shape != () or value.dtype.kind != "U":
        _fail(name, f"must be one string, got an array of shape "
              f"{value.shape} and dtype {value.dtype}")
    version = int(fields["schema_version"])
    if version != SCHEMA_VERSION:
      _fail("schema_version", f"is {version}, this code reads "
            f"{SCHEMA_VERSION}", "re-export the trace with this version")
    ids = fields["ids"]
    if ids.ndim == 3:
      for name, axis in (("num_layers", 1), ("top_k", 2)):
        if int(fields[name]) != ids.shape[axis]:
          _fail(name, f"says {int(fields[name])} but ids have shape "
                f"{ids.shape}")
    _check_fields(fields["step"], fields["request"], fields["phase"],
                  fields["position"], ids, fields["weights"],
                  int(fields["num_experts"]))
    look = fields.get("lookahead_ids")
    if look is not None:
      if look.dtype not in (np.int16, np.int32):
        _fail("lookahead_ids", f"dtype must be int16 or int32, got "
              f"{look.dtype}")
      _check_lookahead(look, ids.shape, int(fields["num_experts"]))
    return cls(step=fields["step"], request=fields["request"],
               phase=fields["phase"], position=fields["position"], ids=ids,
               weights=fields["weights"],
               num_experts=int(fields["num_experts"]),
               model=str(fields["model"]), source=str(fields["source"]),
               lookahead_ids=look)


def from_generate(output: Any, model_config: Any,
                  request_ids: Sequence[int] | None = None,
                  source: str = "wisp_jax.serving.generate") -> RoutingTrace:
  """The recorder: a `RoutingTrace` from `generate(..., record_routing=True)`.

  Pass 0 is the prefill over left-padded prompts `[B, P]`; row b's real
  tokens are its last `prompt_lengths[b]` columns, so padding columns are
  dropped (the live model does route them; a replay of this trace does not
  page for them). Pass s >= 1 is a decode step with one token per row at
  position `prompt_lengths[b] + s - 1`. Events are ordered by step, then row,
  then position.

  Args:
    output: a `GenerateOutput` with `routing_ids`, `routing_weights` and
      `prompt_lengths` set.
    model_config: the `MoEConfig` the model was built from.
    request_ids: one id per batch row (default: the row index).
    source: free-text provenance stored in the trace.

  Returns:
    the trace, steps numbered 0 (prefill) to max_new_tokens - 1; with
    `lookahead_ids` when the output recorded the gate lookahead
    (`routing_lookahead`).
  """
  if output.routing_ids is None or output.routing_weights is None:
    raise ValueError("GenerateOutput has no routing; call generate(..., "
                     "record_routing=True).")
  if output.prompt_lengths is None:
    raise ValueError("GenerateOutput.prompt_lengths is None; it is needed to "
                     "drop the prefill's left padding.")
  lengths = np.asarray(output.prompt_lengths, np.int64)
  batch = lengths.size
  rows = np.arange(batch) if request_ids is None else np.asarray(request_ids)
  if rows.shape != (batch,):
    raise ValueError(f"request_ids has {rows.size} entries for a batch of "
                     f"{batch} rows; pass one id per prompt.")
  cfg_shape = (model_config.num_layers, model_config.top_k)
  columns = {key: [] for key in ("step", "request", "phase", "position",
                                 "ids", "weights", "lookahead_ids")}
  looks = getattr(output, "routing_lookahead", None)
  for step, (ids, weights) in enumerate(zip(output.routing_ids,
                                            output.routing_weights)):
    ids, weights = np.asarray(ids), np.asarray(weights, np.float32)
    if ids.ndim != 4 or (ids.shape[0], ids.shape[3]) != cfg_shape:
      raise ValueError(f"routing_ids[{step}] has shape {ids.shape}; expected "
                       f"[L={cfg_shape[0]}, B, T, K={cfg_shape[1]}]. Is "
                       "model_config the config of the model that ran?")
    width = ids.shape[2]
    if step == 0:
      # [B, P]: column c of row b is real iff c >= P - length_b.
      col = np.arange(width)[None, :]
      real = col >= (width - lengths)[:, None]
      pos = col - (width - lengths)[:, None]
      phase = PREFILL
    else:
      real = np.ones((batch, width), bool)
      pos = (lengths + step - 1)[:, None] + np.arange(width)[None, :]
      phase = DECODE
    b_idx, t_idx = np.nonzero(real)  # row-major: by row, then position
    columns["step"].append(np.full(b_idx.size, step))
    columns["request"].append(rows[b_idx])
    columns["phase"].append(np.full(b_idx.size, phase))
    columns["position"].append(pos[b_idx, t_idx])
    # [L, B, T, K] -> [n, L, K]
    columns["ids"].append(ids[:, b_idx, t_idx].transpose(1, 0, 2))
    columns["weights"].append(weights[:, b_idx, t_idx].transpose(1, 0, 2))
    if looks is not None:
      look = np.asarray(looks[step])
      if look.shape != ids.shape:
        raise ValueError(f"routing_lookahead[{step}] has shape {look.shape}; "
                         f"routing_ids[{step}] has {ids.shape}.")
      columns["lookahead_ids"].append(look[:, b_idx, t_idx].transpose(1, 0, 2))
  merged = {key: np.concatenate(value) for key, value in columns.items()
            if value}
  return RoutingTrace(num_experts=model_config.num_experts,
                      model=model_config.name, source=source, **merged)
