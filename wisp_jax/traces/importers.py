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
Logs do not say prefill or decode: every event's phase is UNKNOWN.

Malformed input raises ValueError naming file and line, or with
`skip_malformed=True` is skipped and counted in the report: a row that is
not UTF-8 or not JSON, lacks a field, has the wrong k, repeated or
out-of-range ids or bad weights, repeats a token of its layer, or (vLLM
per-request logs) comes out of time order within its request; a layer
with under a tenth of the rows of the largest (a corrupt layer number); a
`.gz` file that ends early (its earlier rows are kept) or whose compressed
data is corrupt (all its rows are dropped: they may be damaged).

The `ImportReport` accounts for every row: `rows_read` (well-formed rows)
== `rows_kept` (events x layers) + `warmup_rows_dropped` +
`mismatched_rows` (rows whose token has no row in some other layer), and
`notes` say what was guessed or looks wrong: the layout `auto` chose and
why, layers whose rows end before the others' (a file truncated at a line
end, or a collector that dropped rows), token counts that disagree across
layers, batched steps that do not start at token_idx 0.

What no importer can see: a truncation at a line end that removes whole
events (every layer's rows of the last tokens, or whole last steps of
every layer) leaves a well-formed shorter log; a bit flip that turns a
number into another valid number (an expert id, a gate weight) is another
valid row; two swapped rows of different requests only reorder events.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import functools
import glob
import gzip
import json
import os
import re
import zlib
from typing import Any, Iterable, Sequence

import numpy as np

from wisp_jax.traces.trace import UNKNOWN, RoutingTrace

Paths = str | os.PathLike | Sequence[str | os.PathLike]
_META_KEYS = {"num_experts": ("num_experts", "n_routed_experts",
                              "num_local_experts"),
              "top_k": ("top_k", "topk", "num_experts_per_tok"),
              "model": ("model", "model_name")}
_MAX_EXAMPLES = 20
_MAX_NOTES = 20
# A layer with fewer rows than this share of the largest layer's is taken
# for rows whose layer number is corrupt: every layer sees every token.
_MIN_LAYER_SHARE = 0.1
_MAX_INT = 2 ** 31  # token_idx, layer and expert ids stay below this.
_MAX_WEIGHT = float(np.finfo(np.float32).max)


@dataclasses.dataclass
class ImportReport:
  """What an importer read, kept, dropped and guessed, and why.

  Every well-formed row is accounted for: `rows_read == rows_kept +
  warmup_rows_dropped + mismatched_rows`.

  Attributes:
    files: files read, in order.
    layout: "batched", "per_request" (vLLM logs) or "per_token".
    lines_read: non-blank lines read, metadata and malformed ones included.
    rows_read: well-formed route rows.
    malformed_skipped: lines and rows skipped under `skip_malformed=True`
      (including every row of a file with corrupt compressed data).
    malformed_examples: "file:line: problem" of the first skipped rows.
    warmup_rows_dropped: leading warm-up rows dropped, all layers.
    mismatched_rows: well-formed rows left out because their token had no
      row in some other layer, or their step no counterpart there.
    unmatched_steps: steps, summed over layers, that had no counterpart in
      the layer with the most steps (or it in them); batched layout only.
    events: events in the trace.
    rows_kept: rows in the trace, `events` x its number of layers.
    rows_per_layer: rows of each layer number after warm-up.
    layer_ids: the layer number of each trace layer.
    request_ids: trace request code -> request id in the log.
    num_experts_inferred: nothing gave E; it is max id + 1.
    notes: what was guessed or looks wrong (layout choice, layers that end
      early, token counts that disagree across layers, ...).
  """
  files: tuple[str, ...] = ()
  layout: str = ""
  lines_read: int = 0
  rows_read: int = 0
  malformed_skipped: int = 0
  malformed_examples: list[str] = dataclasses.field(default_factory=list)
  warmup_rows_dropped: int = 0
  mismatched_rows: int = 0
  unmatched_steps: int = 0
  events: int = 0
  rows_kept: int = 0
  rows_per_layer: dict[int, int] = dataclasses.field(default_factory=dict)
  layer_ids: tuple[int, ...] = ()
  request_ids: dict[int, Any] = dataclasses.field(default_factory=dict)
  num_experts_inferred: bool = False
  notes: list[str] = dataclasses.field(default_factory=list)

  def dropped(self) -> dict[str, int]:
    """Rows (or lines) left out of the trace, by reason."""
    return {"malformed (skipped)": self.malformed_skipped,
            "warm-up": self.warmup_rows_dropped,
            "no counterpart in every layer": self.mismatched_rows}

  def summary(self) -> str:
    """A few lines saying what was read, kept and dropped, and why."""
    dropped = ", ".join(f"{n} {why}" for why, n in self.dropped().items()
                        if n) or "nothing"
    lines = [f"{self.layout} log, {len(self.files)} file(s), "
             f"{self.lines_read} lines: {self.rows_read} well-formed route "
             f"rows; kept {self.events} events x {len(self.layer_ids)} "
             f"layers = {self.rows_kept} rows; dropped: {dropped}."]
    lines += [f"  skipped {example}" for example in self.malformed_examples]
    lines += [f"  note: {note}" for note in self.notes]
    return "\n".join(lines)

  def note(self, text: str) -> None:
    if len(self.notes) < _MAX_NOTES:
      self.notes.append(text)


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


def _lines(path: str) -> Iterable[tuple[int, str | None, str | None, str]]:
  """(line number, text, problem, kind) of each non-blank line.

  kind: "line" (text, no problem), "bad_line" (not UTF-8: a problem, no
  text), and at the end of a `.gz` file that cannot be read to its end,
  "truncated" (it ends early: the lines before are sound) or "corrupt" (its
  compressed data is damaged, so lines already read may be too).
  """
  number = 0
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          yield (number, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                 f"at column {e.start + 1})", "bad_line")
          continue
        if text.strip():
          yield number, text, None, "line"
  except EOFError:
    yield (number + 1, None, "the compressed file ends early: it is "
           "truncated", "truncated")
  except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    yield (number + 1, None, f"cannot be read ({type(e).__name__}: {e}): "
           "the file is corrupt, so none of its rows can be trusted",
           "corrupt")


def _loads(line: str) -> tuple[Any, Exception | None]:
  try:
    return json.loads(line), None
  except (ValueError, RecursionError) as e:
    return None, e


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _weight(value: Any) -> bool:
  """A number that is finite as float32 (the trace's weight dtype)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and abs(value) <= _MAX_WEIGHT)


class _Reader:
  """Validates rows and keeps the good ones per layer, in file order."""

  def __init__(self, num_experts, top_k, skip_malformed, report):
    self.known = {"num_experts": num_experts, "top_k": top_k, "model": None}
    self.skip, self.report = skip_malformed, report
    self.layers: dict[int, list[tuple]] = {}  # request, token, ids, ...
    self.hint = ""  # appended to problems found after reading

  def bad(self, where: str, problem: str, what: str = "row") -> None:
    if not self.skip:
      raise ValueError(f"{where}: {problem}. Fix the {what}, or pass "
                       "skip_malformed=True to skip malformed rows.")
    self.report.malformed_skipped += 1
    if len(self.report.malformed_examples) < _MAX_EXAMPLES:
      self.report.malformed_examples.append(f"{where}: {problem}")

  def reject(self, where: str, problem: str) -> None:
    """A row read as well-formed that turns out bad in its context."""
    self.bad(where, problem + self.hint)
    self.report.rows_read -= 1

  def meta(self, where: str, row: dict) -> None:
    for name, aliases in _META_KEYS.items():
      alias = next((a for a in aliases if row.get(a) is not None), None)
      if alias is None:
        continue
      value, old = row[alias], self.known[name]
      if name == "model" and not isinstance(value, str):
        return self.bad(where, f"metadata {alias}={value!r} is not a string")
      if name != "model" and (not _int(value) or value < 1):
        return self.bad(where, f"metadata {alias}={value!r} is not a "
                        "positive int")
      if name != "model" and old is not None and old != value:
        return self.bad(where, f"metadata says {alias}={value!r} but "
                        f"{name}={old!r} was given or read before; pass the "
                        "right value or fix the file")
    for name, aliases in _META_KEYS.items():
      alias = next((a for a in aliases if row.get(a) is not None), None)
      if alias is not None and self.known[name] is None:
        self.known[name] = row[alias]

  def route(self, where: str, values: tuple, names: tuple[str, ...]) -> None:
    request, token, layer, ids, weights = values
    e, k = self.known["num_experts"], self.known["top_k"]
    if (not isinstance(request, (str, int)) or isinstance(request, bool)
        or (_int(request) and abs(request) >= 2 ** 63)):
      return self.bad(where, f"{names[0]} {request!r} is not a str or int")
    for name, value in (("token_idx", token), ("layer", layer)):
      if not _int(value) or not 0 <= value < _MAX_INT:
        return self.bad(where, f"{name} {value!r} is not an int in "
                        f"[0, 2**31)")
    if not isinstance(ids, list) or not ids or not all(
        _int(i) and abs(i) < _MAX_INT for i in ids):
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
        map(_weight, weights)):
      return self.bad(where, f"{names[4]} {weights!r} is not {k} finite "
                      "numbers")
    self.layers.setdefault(layer, []).append(
        (request, token, ids, weights, where))
    self.report.rows_read += 1

  def drop_rows_since(self, sizes: dict[int, int]) -> int:
    """Drops every row added since the layers had `sizes` rows."""
    dropped = 0
    for layer, rows in self.layers.items():
      dropped += len(rows) - sizes.get(layer, 0)
      del rows[sizes.get(layer, 0):]
    self.layers = {l: rows for l, rows in self.layers.items() if rows}
    self.report.rows_read -= dropped
    self.report.malformed_skipped += dropped
    return dropped

  def drop_small_layers(self) -> None:
    """Rejects the rows of layers far smaller than the largest: every layer
    sees every token, so such a layer is mostly corrupt layer numbers, and
    keeping it would leave only its few tokens in the trace."""
    if not self.layers:
      return
    largest = max(sorted(self.layers), key=lambda l: len(self.layers[l]))
    most = len(self.layers[largest])
    for layer in sorted(self.layers):
      rows = self.layers[layer]
      if len(rows) < _MIN_LAYER_SHARE * most:
        for row in rows:
          self.reject(row[4], f"layer {layer} has {len(rows)} row(s), under "
                      f"a tenth of layer {largest}'s {most}: a corrupt layer "
                      "number (or a file truncated early)")
        del self.layers[layer]


def _read(paths: Paths, fields: tuple, num_experts, top_k, skip_malformed,
          report: ImportReport) -> _Reader:
  """Reads every file; `fields`: request keys, token, layer, ids, weights."""
  files = resolve_paths(paths)
  report.files = tuple(files)
  reader = _Reader(num_experts, top_k, skip_malformed, report)
  read_as_meta = set()
  for path in files:  # leading metadata lines first, so E and K are known
    lines = _lines(path)
    number, line, problem, _ = next(iter(lines), (0, None, "empty", ""))
    lines.close()
    row, _ = _loads(line) if problem is None else (None, None)
    if isinstance(row, dict) and row.get("type") == "meta":
      reader.meta(f"{path}:{number}", row)
      read_as_meta.add((path, number))
  names = ("/".join(fields[0]),) + fields[1:]
  for path in files:
    sizes = {l: len(rows) for l, rows in reader.layers.items()}
    lines_before, had_problem = report.lines_read, False
    for number, line, problem, kind in _lines(path):
      where = f"{path}:{number}"
      report.lines_read += kind in ("line", "bad_line")
      if problem is not None:
        had_problem = True
        if kind == "corrupt" and skip_malformed:
          dropped = reader.drop_rows_since(sizes)
          problem += f"; its {dropped} row(s) read before were dropped"
        reader.bad(where, problem, "row" if kind == "bad_line" else "file")
        continue
      if (path, number) in read_as_meta:
        continue
      row, error = _loads(line)
      row_type = row.get("type", "route") if isinstance(row, dict) else None
      if row_type == "meta":
        reader.meta(where, row)
        continue
      if row_type != "route":
        reader.bad(where, f"not valid JSON ({error})" if error else
                   "not a JSON object" if row_type is None else
                   f"unknown row type {row_type!r} (expected 'route' or "
                   "'meta')")
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
    if report.lines_read == lines_before and not had_problem:
      reader.bad(path, "holds no lines: an empty (or truncated) file",
                 "file")
  reader.drop_small_layers()
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


def _select(col: dict, keep: np.ndarray) -> dict:
  return {name: value[keep] for name, value in col.items()}


def _by_request(col: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Row order grouping each request's rows in file order, and the request
  and token_idx columns in that order."""
  order = np.lexsort((np.arange(len(col["token"])), col["request"]))
  return order, col["request"][order], col["token"][order]


def _non_decreasing(tokens: Sequence[int]) -> np.ndarray:
  """Mask of a longest non-decreasing subsequence of `tokens`: the rows to
  keep when some are out of order (fewest dropped)."""
  tails, tail_at, back = [], [], np.full(len(tokens), -1)
  for i, token in enumerate(tokens):
    j = bisect.bisect_right(tails, token)
    if j == len(tails):
      tails.append(token)
      tail_at.append(i)
    else:
      tails[j], tail_at[j] = token, i
    back[i] = tail_at[j - 1] if j else -1
  keep = np.zeros(len(tokens), bool)
  i = tail_at[-1] if tail_at else -1
  while i >= 0:
    keep[i], i = True, back[i]
  return keep


def _in_time_order(reader: _Reader, col: dict) -> dict:
  """Per-request logs are in time order, so each request's token_idx rises
  within a layer; rows that break the rise (fewest possible) are bad."""
  order, req, tok = _by_request(col)
  falls = (req[1:] == req[:-1]) & (tok[1:] < tok[:-1])
  if not falls.any():
    return col
  keep = np.ones(len(order), bool)
  for request in np.unique(req[1:][falls]):
    rows = order[req == request]  # this request's rows, in file order
    tokens = col["token"][rows]
    for i in np.flatnonzero(~_non_decreasing(tokens.tolist())):
      before = f" after token_idx {tokens[i - 1]}" if i else ""
      reader.reject(col["where"][rows[i]],
                    f"token_idx {tokens[i]} of request {request} comes"
                    f"{before} in this layer: out of time order")
      keep[rows[i]] = False
  return _select(col, keep)


def _keyed_by_request(reader: _Reader, col: dict) -> dict:
  """Keys rows (request, token); a repeat of a key in a layer is bad."""
  pairs = np.stack([col["request"], col["token"]], 1)
  first = np.zeros(len(pairs), bool)
  first[np.unique(pairs, axis=0, return_index=True)[1]] = True
  for i in np.flatnonzero(~first):
    reader.reject(col["where"][i], f"repeats request {col['request'][i]} "
                  f"token {col['token'][i]} of the same layer")
  col = _select(col, first)
  col["a"], col["b"] = col["request"], col["token"]
  return col


def _detect_layout(cols: dict[int, dict]) -> tuple[str, str]:
  """"batched" or "per_request", and why.

  A batched log restarts token_idx at 0 at every forward step, in every
  layer; a per-request log never restarts a request's token_idx. One bad
  row (a repeated or swapped line) restarts it once, in one layer, rarely
  at 0: so batched needs at least two restarts in every layer, most of
  them to 0. Shorter batched logs need layout="batched".
  """
  restarts, to_zero = {}, 0
  for layer, col in cols.items():
    _, req, tok = _by_request(col)
    restart = (req[1:] == req[:-1]) & (tok[1:] <= tok[:-1])
    restarts[layer] = int(restart.sum())
    to_zero += int(np.sum(restart & (tok[1:] == 0)))
  total = sum(restarts.values())
  fewest = min(restarts.values())
  batched = fewest >= 2 and 2 * to_zero > total
  layout = "batched" if batched else "per_request"
  return layout, (
      f"layout 'auto' chose {layout}: token_idx restarts within a request "
      f"{total} time(s) ({to_zero} at 0), at least {fewest} time(s) per "
      "layer (batched needs 2 per layer, most at 0); pass layout= to "
      "override.")


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


def _note_per_request(cols: dict[int, dict], report: ImportReport) -> None:
  """Notes layers whose rows of a request stop before the other layers'
  (a file truncated at a line end, or dropped rows) and requests whose
  token counts disagree across layers."""
  layers = sorted(cols)
  if len(layers) < 2:
    return
  requests = np.unique(np.concatenate([cols[l]["request"] for l in layers]))
  counts = np.zeros((len(layers), len(requests)), np.int64)
  last = np.full((len(layers), len(requests)), -1, np.int64)
  for i, l in enumerate(layers):
    r = np.searchsorted(requests, cols[l]["request"])
    np.add.at(counts[i], r, 1)
    np.maximum.at(last[i], r, cols[l]["token"])
  name = {r: report.request_ids.get(int(r), r) for r in requests}
  disagree = np.flatnonzero(np.any(counts != counts[:1], axis=0))
  if disagree.size:
    r = disagree[0]
    report.note(
        f"token counts of {disagree.size} of {len(requests)} request(s) "
        f"disagree across layers (request {name[requests[r]]!r}: "
        f"{dict(zip(layers, counts[:, r].tolist()))} rows per layer); the "
        "tokens concerned were dropped (mismatched_rows).")
  ends = last.max(axis=0)
  for i, l in enumerate(layers):
    early = np.flatnonzero(last[i] < ends)
    if early.size:
      r = early[0]
      report.note(
          f"layer {l}'s rows of {early.size} request(s) stop before the "
          f"other layers' (request {name[requests[r]]!r} "
          f"ends at token_idx {last[i, r]} here, at {ends[r]} elsewhere; "
          f"the layer's last row is {cols[l]['where'][-1]}): a file "
          "truncated at a line end, or rows dropped by the collector.")


def _note_batched(cols: dict[int, dict], step_counts: dict[int, int],
                  report: ImportReport) -> None:
  """Notes layers whose step count differs from the reference's, layers
  that end before the others (fewer steps, or a shorter last step) and
  steps that do not start at token_idx 0."""
  most = max(sorted(step_counts), key=step_counts.get)
  ref_steps = step_counts[most]
  for l in sorted(step_counts):
    if step_counts[l] != ref_steps:
      report.note(
          f"layer {l} has {step_counts[l]} steps, layer {most} "
          f"{ref_steps}: steps were lost, split or merged by dropped, "
          "repeated or reordered rows; steps were paired by their token_idx "
          "patterns and those without a counterpart dropped.")
  last_size = {l: int(np.sum(c["a"] == ref_steps - 1)) for l, c in
               cols.items()}
  full = max(last_size.values())
  for l, col in sorted(cols.items()):
    last = int(col["a"].max()) if len(col["a"]) else -1
    if last < ref_steps - 1:
      report.note(
          f"layer {l} ends {ref_steps - 1 - last} step(s) before the other "
          f"layers (its last row is {col['where'][-1]}): a file truncated "
          "at a line end, or rows dropped by the collector; the steps "
          "concerned were dropped.")
    elif last_size[l] < full:
      report.note(
          f"layer {l}'s last step has {last_size[l]} of {full} rows (its "
          f"last row is {col['where'][-1]}): a file truncated at a line "
          "end, or rows dropped by the collector.")
    starts = np.flatnonzero(np.diff(col["a"], prepend=-1) != 0)
    late = int(np.sum(col["b"][starts] > 0))
    if late:
      report.note(
          f"layer {l}: {late} step(s) start at a token_idx > 0 (the first "
          f"at {col['where'][starts[col['b'][starts] > 0][0]]}): a dropped "
          "row 0, or rows out of order.")


def _assemble(layers: dict[int, dict], report: ImportReport, known: dict,
              model: str | None, order_layer: int | None
              ) -> tuple[RoutingTrace, ImportReport]:
  """Joins layers on their keys (a, b): (step, token) in the batched layout,
  else (request, token), where each event is a step of its own. Events in
  key order, or in the row order of `order_layer`."""
  layer_ids = sorted(layers)
  # Dense codes of the (a, b) pairs: no arithmetic that could overflow.
  pairs, inverse = np.unique(np.concatenate(
      [np.stack([layers[l]["a"], layers[l]["b"]], 1) for l in layer_ids]),
                             axis=0, return_inverse=True)
  bounds = np.cumsum([0] + [len(layers[l]["a"]) for l in layer_ids])
  keys = {l: inverse.reshape(-1)[bounds[i]:bounds[i + 1]]
          for i, l in enumerate(layer_ids)}
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
  if layer_ids != list(range(layer_ids[0], layer_ids[-1] + 1)):
    report.note(f"layer numbers {layer_ids} are not contiguous: a layer's "
                "rows may be missing (an empty or truncated file).")
  report.events, report.rows_kept = n, n * len(layer_ids)
  if n == 0:
    report.note("no token has a row in every layer: the trace is empty.")
  step = (np.unique(pairs[common, 0], return_inverse=True)[1].reshape(-1)
          if report.layout == "batched" else np.arange(n))
  shape = (n, len(layer_ids), known["top_k"])
  return RoutingTrace(
      step=step, request=request, phase=np.full(n, UNKNOWN),
      position=pairs[common, 1], ids=np.stack(ids, 1).reshape(shape),
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
      the layer with the most rows; a row whose token_idx repeats or falls
      back within its request and layer is malformed. "auto": batched if
      in every layer some request's token_idx restarts at least twice,
      mostly at 0 (so that one repeated or swapped line cannot make a
      per-request log batched), else per_request; the report's notes say
      why. A short batched log (fewer than 3 steps) needs "batched".
    drop_warmup: drop each layer's leading run of rows that all have one
      expert set (vLLM's warm-up passes) if it is at least
      `min_warmup_rows` long; batched: cut back to a step boundary.
    min_warmup_rows: shortest run taken for a warm-up.
    skip_malformed: skip and count malformed rows instead of raising.
    model: model name (else from a meta line).

  Returns:
    (trace, report).

  Raises:
    ValueError: naming file and line, for a malformed row (unless
      `skip_malformed`), or if no row is left.
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
    layout, why = _detect_layout(cols)
    report.note(why)
    if layout == "per_request":
      reader.hint = (" (layout='auto' read the log as per-request; pass "
                     "layout='batched' if token_idx restarts at each forward "
                     "step)")
  report.layout = layout
  steps = {}
  for l, col in list(cols.items()):
    step = _step_of_row(col) if layout == "batched" else None
    drop = _warmup_rows(col["ids"], step, min_warmup_rows) if drop_warmup \
        else 0
    report.warmup_rows_dropped += drop
    col = {name: value[drop:] for name, value in col.items()}
    if layout == "per_request":
      col = _keyed_by_request(reader, _in_time_order(reader, col))
    report.rows_per_layer[l] = len(col["token"])
    if not len(col["token"]):
      del cols[l]
    elif layout == "batched":
      cols[l], steps[l] = col, step[drop:] - step[drop]
    else:
      cols[l] = col
  if not cols:
    raise ValueError(f"no route rows left in {report.files} after warm-up "
                     "and malformed rows; check drop_warmup/min_warmup_rows.")
  if layout == "per_request":
    most = max(sorted(cols), key=lambda l: len(cols[l]["token"]))
    _note_per_request(cols, report)
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
      cols[l] = _select(col, to_ref >= 0)
      cols[l]["a"], cols[l]["b"] = to_ref[to_ref >= 0], cols[l]["token"]
    _note_batched(cols, {l: len(p) for l, p in patterns.items()}, report)
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
  _note_per_request(cols, report)
  return _assemble(cols, report, reader.known, model, None)
