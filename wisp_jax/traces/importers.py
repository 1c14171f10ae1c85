"""Importers of routing logs written by other systems into `RoutingTrace`.

JSON-lines formats, one object per (token, layer):

  vLLM-style route logs (`import_vllm_routes`), in time order, all layers
  in one file or one file per layer, optionally after a metadata line
  `{"type": "meta", "num_experts": .., "top_k": .., "model": ..}`:
    {"type": "route", "req_id": ..., "token_idx": ..., "layer": ...,
     "topk_ids": [...], "topk_weights": [...]}
  per-token logs (`import_per_token`), rows in any order:
    {"problem_id" or "request_id": ..., "layer": ..., "token_idx": ...,
     "experts": [...], "gating_probs": [...]}

Paths: a file, a list, a directory (all its files) or a glob; `.gz` files
are read compressed. Trace layer l is the l-th smallest layer number seen.
Logs do not say prefill or decode: every event's phase is UNKNOWN. A
malformed row (bad JSON, missing field, wrong k, repeated or out-of-range
ids, bad weights, a repeated token) raises ValueError naming file and line,
or with `skip_malformed=True` is skipped and counted in the report.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import gzip
import json
import math
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from wisp_jax.traces.trace import UNKNOWN, RoutingTrace

Paths = str | os.PathLike | Sequence[str | os.PathLike]
_META_KEYS = {"num_experts": ("num_experts", "n_routed_experts",
                              "num_local_experts"),
              "top_k": ("top_k", "topk", "num_experts_per_tok"),
              "model": ("model", "model_name")}
_MAX_EXAMPLES = 20


@dataclasses.dataclass
class ImportReport:
  """What an importer read, dropped and guessed.

  Attributes:
    files: files read, in order.
    layout: "batched", "per_request" (vLLM logs) or "per_token".
    rows_read: well-formed route rows.
    malformed_skipped: rows skipped under `skip_malformed=True`.
    malformed_examples: "file:line: problem" of the first skipped rows.
    warmup_rows_dropped: leading warm-up rows dropped, all layers.
    mismatched_rows: well-formed rows left out because their token had no
      row in some other layer, or their step no counterpart there.
    unmatched_steps: steps, summed over layers, that had no counterpart in
      the layer with the most steps (or it in them); batched layout only.
    rows_per_layer: rows of each layer number after warm-up.
    layer_ids: the layer number of each trace layer.
    request_ids: trace request code -> request id in the log.
    num_experts_inferred: nothing gave E; it is max id + 1.
  """
  files: tuple[str, ...] = ()
  layout: str = ""
  rows_read: int = 0
  malformed_skipped: int = 0
  malformed_examples: list[str] = dataclasses.field(default_factory=list)
  warmup_rows_dropped: int = 0
  mismatched_rows: int = 0
  unmatched_steps: int = 0
  rows_per_layer: dict[int, int] = dataclasses.field(default_factory=dict)
  layer_ids: tuple[int, ...] = ()
  request_ids: dict[int, Any] = dataclasses.field(default_factory=dict)
  num_experts_inferred: bool = False


def resolve_paths(paths: Paths) -> list[str]:
  """Files named by a path, a list of paths, a directory or a glob."""
  items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  files = []
  for item in map(str, items):
    pattern = os.path.join(glob.escape(item), "*") if os.path.isdir(item) \
        else item
    found = [f for f in glob.glob(pattern) if os.path.isfile(f)]
    if not found:
      raise ValueError(f"routing log {item!r} names no files (no such file, "
                       "an empty directory or a glob matching nothing).")
    files += sorted(found, key=lambda p: [  # natural: layer_2 < layer_10
        int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p)])
  return files


def _lines(path: str) -> Iterable[tuple[int, str]]:
  with (gzip.open if path.endswith(".gz") else open)(
      path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        yield number, line


def _loads(line: str) -> tuple[Any, Exception | None]:
  try:
    return json.loads(line), None
  except ValueError as e:
    return None, e


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
  """Validates rows and keeps the good ones per layer, in file order."""

  def __init__(self, num_experts, top_k, skip_malformed, report):
    self.known = {"num_experts": num_experts, "top_k": top_k, "model": None}
    self.skip, self.report = skip_malformed, report
    self.layers: dict[int, list[tuple]] = {}  # request, token, ids, ...

  def bad(self, where: str, problem: str) -> None:
    if not self.skip:
      raise ValueError(f"{where}: {problem}. Fix the row, or pass "
                       "skip_malformed=True to skip malformed rows.")
    self.report.malformed_skipped += 1
    if len(self.report.malformed_examples) < _MAX_EXAMPLES:
      self.report.malformed_examples.append(f"{where}: {problem}")

  def meta(self, where: str, row: dict) -> None:
    for name, aliases in _META_KEYS.items():
      alias = next((a for a in aliases if row.get(a) is not None), None)
      if alias is None:
        continue
      value, old = row[alias], self.known[name]
      if name != "model" and (not _int(value) or value < 1):
        raise ValueError(f"{where}: metadata {alias}={value!r} is not a "
                         "positive int; fix the file.")
      if name != "model" and old is not None and old != value:
        raise ValueError(f"{where}: metadata says {alias}={value!r} but "
                         f"{name}={old!r} was given or read before; pass the "
                         "right value or fix the file.")
      self.known[name] = value if old is None else old

  def route(self, where: str, values: tuple, names: tuple[str, ...]) -> None:
    request, token, layer, ids, weights = values
    e, k = self.known["num_experts"], self.known["top_k"]
    if not isinstance(request, (str, int)) or isinstance(request, bool):
      return self.bad(where, f"{names[0]} {request!r} is not a str or int")
    for name, value in (("token_idx", token), ("layer", layer)):
      if not _int(value) or value < 0:
        return self.bad(where, f"{name} {value!r} is not an int >= 0")
    if not isinstance(ids, list) or not ids or not all(map(_int, ids)):
      return self.bad(where, f"{names[3]} {ids!r} is not a list of ints")
    if k is None:
      self.known["top_k"] = k = len(ids)
    if len(ids) != k:
      return self.bad(where, f"{names[3]} has {len(ids)} ids, expected "
                      f"top_k={k}")
    if len(set(ids)) != k:
      return self.bad(where, f"{names[3]} {ids} repeats an expert")
    if min(ids) < 0 or (e is not None and max(ids) >= e):
      return self.bad(where, f"{names[3]} {ids} outside [0, {e or 'E'})")
    if not isinstance(weights, list) or len(weights) != k or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool)
        and math.isfinite(w) for w in weights):
      return self.bad(where, f"{names[4]} {weights!r} is not {k} finite "
                      "numbers")
    self.layers.setdefault(layer, []).append(
        (request, token, ids, weights, where))
    self.report.rows_read += 1


def _read(paths: Paths, fields: tuple, num_experts, top_k, skip_malformed,
          report: ImportReport) -> _Reader:
  """Reads every file; `fields`: request keys, token, layer, ids, weights."""
  files = resolve_paths(paths)
  report.files = tuple(files)
  reader = _Reader(num_experts, top_k, skip_malformed, report)
  for path in files:  # leading metadata lines first, so E and K are known
    number, line = next(iter(_lines(path)), (0, "{}"))
    row, _ = _loads(line)
    if isinstance(row, dict) and row.get("type") == "meta":
      reader.meta(f"{path}:{number}", row)
  names = ("/".join(fields[0]),) + fields[1:]
  for path in files:
    for number, line in _lines(path):
      where = f"{path}:{number}"
      row, error = _loads(line)
      kind = row.get("type", "route") if isinstance(row, dict) else None
      if kind == "meta":
        reader.meta(where, row)
        continue
      if kind != "route":
        reader.bad(where, f"not valid JSON ({error})" if error else
                   "not a JSON object" if kind is None else
                   f"unknown row type {kind!r} (expected 'route' or 'meta')")
        continue
      request = next((row[r] for r in fields[0] if r in row), None)
      missing = [f for f in fields[1:] if f not in row]
      if request is None:
        missing.insert(0, " or ".join(fields[0]))
      if missing:
        reader.bad(where, f"missing field(s) {missing}")
        continue
      reader.route(where, (request,) + tuple(row[f] for f in fields[1:]),
                   names)
  if not reader.layers:
    raise ValueError(f"no valid route rows in {files}.")
  return reader


def _columns(reader: _Reader, report: ImportReport, sort: bool
             ) -> dict[int, dict[str, np.ndarray]]:
  """Per-layer numpy columns. Request ids that are all ints >= 0 are kept;
  otherwise they get codes in order of appearance (or sorted if `sort`)."""
  seen = list(dict.fromkeys(r[0] for rows in reader.layers.values()
                            for r in rows))
  if all(_int(r) and r >= 0 for r in seen):
    report.request_ids = {r: r for r in sorted(seen)}
  else:
    report.request_ids = dict(enumerate(sorted(seen, key=str) if sort
                                        else seen))
  codes = {r: code for code, r in report.request_ids.items()}
  out = {}
  for layer, rows in reader.layers.items():
    request, token, ids, weights, where = zip(*rows)
    out[layer] = {"request": np.array([codes[r] for r in request], np.int64),
                  "token": np.array(token, np.int64),
                  "ids": np.array(ids, np.int64),
                  "weights": np.array(weights, np.float32),
                  "where": np.array(where, object)}
  return out


def _keyed_by_request(reader: _Reader, col: dict) -> dict:
  """Keys rows (request, token); a repeat of a key in a layer is bad."""
  key = col["request"] * (1 + int(col["token"].max())) + col["token"]
  first = np.zeros(len(key), bool)
  first[np.unique(key, return_index=True)[1]] = True
  for i in np.flatnonzero(~first):
    reader.bad(col["where"][i], f"repeats request {col['request'][i]} "
               f"token {col['token'][i]} of the same layer")
  col = {name: value[first] for name, value in col.items()}
  col["a"], col["b"] = col["request"], col["token"]
  return col


def _step_of_row(col: dict) -> np.ndarray:
  """Batched layout: a token_idx that does not increase, or a new req_id,
  starts a new forward step. Returns each row's step."""
  req, tok = col["request"], col["token"]
  new = np.ones(len(tok), bool)
  new[1:] = (tok[1:] <= tok[:-1]) | (req[1:] != req[:-1])
  return np.cumsum(new) - 1


def _warmup_rows(ids: np.ndarray, step: np.ndarray | None,
                 min_rows: int) -> int:
  """Leading rows of a layer that repeat row 0's expert set (if at least
  `min_rows`), cut back to the start of the step where the run ends."""
  sets = np.sort(ids, axis=1)
  differs = np.any(sets != sets[0], axis=1)
  run = int(np.argmax(differs)) if differs.any() else len(sets)
  if run < min_rows:
    return 0
  return run if step is None or run == len(sets) else int(
      np.searchsorted(step, step[run]))


def _align_steps(ref: list[tuple], other: list[tuple]) -> np.ndarray:
  """Reference step of each of `other`'s steps (-1: unmatched), matching
  their token_idx patterns. Runs of steps that do not pair one to one are
  left unmatched, never guessed."""
  if len(ref) == len(other):
    return np.arange(len(other))
  to_ref = np.full(len(other), -1)
  for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
      None, ref, other).get_opcodes():
    if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
      to_ref[j1:j2] = np.arange(i1, i2)
  return to_ref


def _assemble(layers: dict[int, dict], report: ImportReport, known: dict,
              model: str | None, order_layer: int | None
              ) -> tuple[RoutingTrace, ImportReport]:
  """Joins layers on their keys (a, b): (step, token) in the batched layout,
  else (request, token), where each event is a step of its own. Events in
  key order, or in the row order of `order_layer`."""
  layer_ids = sorted(layers)
  span = 1 + max(int(c["b"].max()) for c in layers.values())
  keys = {l: c["a"] * span + c["b"] for l, c in layers.items()}
  common = np.unique(functools.reduce(np.intersect1d,
                                      [keys[l] for l in layer_ids]))
  if order_layer is not None:  # keys are unique within a layer
    common = keys[order_layer][np.isin(keys[order_layer], common)]
  ids, weights, request, n = [], [], None, len(common)
  for l in layer_ids:
    key_order = np.argsort(keys[l], kind="stable")
    rows = key_order[np.searchsorted(keys[l], common, sorter=key_order)]
    ids.append(layers[l]["ids"][rows])
    weights.append(layers[l]["weights"][rows])
    request = layers[l]["request"][rows] if request is None else request
    report.mismatched_rows += len(keys[l]) - n
  num_experts = known["num_experts"]
  if num_experts is None:
    report.num_experts_inferred = True
    num_experts = 1 + max(int(c["ids"].max()) for c in layers.values())
  report.layer_ids = tuple(layer_ids)
  step = (np.unique(common // span, return_inverse=True)[1]
          if report.layout == "batched" else np.arange(n))
  shape = (n, len(layer_ids), known["top_k"])
  return RoutingTrace(
      step=step, request=request, phase=np.full(n, UNKNOWN),
      position=common % span, ids=np.stack(ids, 1).reshape(shape),
      weights=np.stack(weights, 1).reshape(shape), num_experts=num_experts,
      model=model or known["model"] or "",
      source=f"{report.layout}:{','.join(report.files)}"), report


def import_vllm_routes(
    paths: Paths, *, num_experts: int | None = None, top_k: int | None = None,
    layout: str = "auto", drop_warmup: bool = False,
    min_warmup_rows: int = 64, skip_malformed: bool = False,
    model: str | None = None) -> tuple[RoutingTrace, ImportReport]:
  """Reads vLLM-style route logs (see the module docstring).

  Args:
    paths: file(s), directory or glob.
    num_experts: E (else from a meta line, else max id + 1).
    top_k: K (else from a meta line, else the first row's length).
    layout: "batched": `req_id` names a whole batched run and `token_idx`
      is the row in the current forward batch; a token_idx <= the previous
      row's (or a new req_id) starts a new step; events are keyed (step,
      token_idx) and `position` is token_idx. If layers recover different
      step counts (a whole step dropped), steps are matched to the layer
      with the most steps by token_idx pattern; steps that do not pair up
      are dropped and counted. "per_request": `req_id` is a request and
      `token_idx` its position; one event per step, in the file order of
      the layer with the most rows. "auto": batched if some request's
      token_idx ever fails to increase.
    drop_warmup: drop each layer's leading run of rows that all have one
      expert set (vLLM's warm-up passes) if it is at least
      `min_warmup_rows` long; batched: cut back to a step boundary.
    min_warmup_rows: shortest run taken for a warm-up.
    skip_malformed: skip and count malformed rows instead of raising.
    model: model name (else from a meta line).

  Returns:
    (trace, report).
  """
  if layout not in ("auto", "batched", "per_request"):
    raise ValueError(f"layout must be 'auto', 'batched' or 'per_request', "
                     f"got {layout!r}.")
  report = ImportReport()
  reader = _read(paths, (("req_id",), "token_idx", "layer", "topk_ids",
                         "topk_weights"), num_experts, top_k,
                 skip_malformed, report)
  cols = _columns(reader, report, sort=False)
  if layout == "auto":
    layout = "per_request"
    for col in cols.values():
      order = np.lexsort((np.arange(len(col["token"])), col["request"]))
      req, tok = col["request"][order], col["token"][order]
      if np.any((req[1:] == req[:-1]) & (tok[1:] <= tok[:-1])):
        layout = "batched"
  report.layout = layout
  steps = {}
  for l, col in list(cols.items()):
    step = _step_of_row(col) if layout == "batched" else None
    drop = _warmup_rows(col["ids"], step, min_warmup_rows) if drop_warmup \
        else 0
    report.warmup_rows_dropped += drop
    col = {name: value[drop:] for name, value in col.items()}
    report.rows_per_layer[l] = len(col["token"])
    if not len(col["token"]):
      del cols[l]
    elif layout == "batched":
      cols[l], steps[l] = col, step[drop:] - step[drop]
    else:
      cols[l] = _keyed_by_request(reader, col)
  if not cols:
    raise ValueError(f"no route rows left in {report.files} after warm-up "
                     "and malformed rows; check drop_warmup/min_warmup_rows.")
  if layout == "per_request":
    most = max(sorted(cols), key=lambda l: len(cols[l]["token"]))
  else:
    patterns = {l: [tuple(t) for t in np.split(
        cols[l]["token"], np.flatnonzero(np.diff(steps[l])) + 1)]
                for l in cols}
    most = max(sorted(cols), key=lambda l: len(patterns[l]))
    for l, col in cols.items():
      to_ref = _align_steps(patterns[most], patterns[l])[steps[l]]
      matched = len(np.unique(to_ref[to_ref >= 0]))
      report.unmatched_steps += (len(patterns[l]) + len(patterns[most])
                                 - 2 * matched)
      report.mismatched_rows += int(np.sum(to_ref < 0))
      cols[l] = {name: value[to_ref >= 0] for name, value in col.items()}
      cols[l]["a"], cols[l]["b"] = to_ref[to_ref >= 0], cols[l]["token"]
  return _assemble(cols, report, reader.known, model,
                   most if layout == "per_request" else None)


def import_per_token(
    paths: Paths, *, num_experts: int | None = None,
    top_k: int | None = None, skip_malformed: bool = False,
    model: str | None = None) -> tuple[RoutingTrace, ImportReport]:
  """Reads per-token JSON lines (see the module docstring), any row order.

  Events are sorted to time order (request, token), one event per step;
  requests by id, numerically if all ids are ints, else as strings.
  Arguments and result are those of `import_vllm_routes`.
  """
  report = ImportReport(layout="per_token")
  reader = _read(paths, (("problem_id", "request_id"), "token_idx", "layer",
                         "experts", "gating_probs"), num_experts, top_k,
                 skip_malformed, report)
  cols = {l: _keyed_by_request(reader, col)
          for l, col in _columns(reader, report, sort=True).items()}
  report.rows_per_layer = {l: len(c["token"]) for l, c in cols.items()}
  return _assemble(cols, report, reader.known, model, None)
