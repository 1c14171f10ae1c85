"""Fuzzing of the vLLM route-log importer (wisp_jax/traces/importers.py).

Each mutation (truncation at a random offset, a bit flip, a bad UTF-8
byte, a repeated, swapped or deleted line, a truncated `.gz`) must either
raise ValueError naming the file, or import the original events, with
every lost one accounted for in the report. The exceptions, checked
explicitly: a flip inside a number can make another valid row (one event
may then differ), and a truncation between two complete tokens is a
well-formed shorter log (a prefix of the events).
"""

import gzip
import json

import numpy as np
import pytest

from wisp_jax.traces import importers, synthetic

KINDS = ("truncate", "flip", "bad_utf8", "repeat_line", "swap_lines",
         "delete_line")


def _route(req, token, layer, ids, weights):
  return {"type": "route", "req_id": req, "token_idx": int(token),
          "layer": layer, "topk_ids": [int(i) for i in ids],
          "topk_weights": [float(w) for w in weights]}


def _mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
  lines = data.split(b"\n")[:-1]  # the last line ends with a newline
  out = bytearray(data)
  if kind == "truncate":
    return data[:rng.integers(len(data))]
  if kind == "flip":
    out[rng.integers(len(data))] ^= 1 << rng.integers(8)
    return bytes(out)
  if kind == "bad_utf8":
    out[rng.integers(len(data))] = 0xFF
    return bytes(out)
  i, j = sorted(rng.choice(len(lines), 2, replace=False))
  if kind == "repeat_line":
    lines.insert(j, lines[i])
  elif kind == "swap_lines":
    lines[i], lines[j] = lines[j], lines[i]
  else:
    del lines[i]
  return b"\n".join(lines) + b"\n"


def _events(trace, report, layers=None) -> dict:
  """(request id in the log, position) -> (ids, weights) bytes of `layers`
  (all if None)."""
  layers = slice(None) if layers is None else list(layers)
  ids = report.request_ids.get if report else (lambda r: f"req-{r}")
  return {(ids(int(r)), int(p)): (i[layers].tobytes(), w[layers].tobytes())
          for r, p, i, w in zip(trace.request, trace.position, trace.ids,
                                trace.weights)}


def _check_import(paths, mutated, kind, trace, skip_malformed):
  """Imports `paths`; returns what the mutation did, or fails the test."""
  try:
    got, report = importers.import_vllm_routes(
        paths, skip_malformed=skip_malformed)
  except ValueError as e:
    assert mutated in str(e), (kind, str(e))
    return "refused"
  assert report.rows_read == (report.rows_kept + report.warmup_rows_dropped
                              + report.mismatched_rows), report.summary()
  if report.layer_ids != (0, 1, 2):
    # A layer's file cut down to its metadata line is a well-formed
    # metadata file (or its rows were skipped on request).
    assert skip_malformed or kind == "truncate", (kind, report.layer_ids)
  want = _events(trace, None, report.layer_ids)
  events = _events(got, report)
  changed = [k for k, v in events.items() if want.get(k) != v]
  lost = [k for k in want if k not in events]
  # Another valid number in one row is another valid row.
  assert len(changed) <= (kind == "flip"), (kind, changed, report.summary())
  if lost and len(lost) > report.mismatched_rows:
    # Not accounted as rows without a counterpart: whole tokens are gone,
    # which only a cut or a deleted line can do, from the end of the log.
    assert list(events) == list(want)[:len(events)], (kind, lost)
  if kind in ("repeat_line", "swap_lines") and not skip_malformed:
    assert not lost, (kind, lost, report.summary())
  return "same" if not changed and not lost else "changed"


@pytest.mark.parametrize("per_layer_files, compress", [
    (False, False), (True, False), (False, True)])
def test_fuzz_per_request_route_logs(tmp_path, per_layer_files, compress):
  trace = synthetic.uniform(3, 8, 2, 4, 5, 2, seed=11)  # 20 events
  files = {}
  for layer in range(3) if per_layer_files else [None]:
    rows = [{"type": "meta", "num_experts": 8, "top_k": 2}] + [
        _route(f"req-{trace.request[i]}", trace.position[i], l,
               trace.ids[i, l], trace.weights[i, l])
        for i in range(trace.num_tokens) for l in range(3)
        if layer is None or l == layer]
    suffix = ".jsonl.gz" if compress else ".jsonl"
    path = tmp_path / f"layer_{0 if layer is None else layer}{suffix}"
    files[path] = "".join(json.dumps(r) + "\n" for r in rows).encode()
  rng = np.random.default_rng(int(per_layer_files) + 2 * int(compress))
  outcomes = {"refused": 0, "same": 0, "changed": 0}
  for trial in range(36):
    target = list(files)[trial % len(files)]
    kind = KINDS[rng.integers(len(KINDS))]
    for path, text in files.items():
      data = _mutate(text, kind, rng) if path == target else text
      if compress:
        data = gzip.compress(data, mtime=0)
        if path == target and kind == "truncate":  # cut the stream instead
          data = gzip.compress(text, mtime=0)
          data = data[:rng.integers(10, len(data))]
      path.write_bytes(data)
    for skip in (False, True):
      outcome = _check_import(tmp_path, str(target), kind, trace, skip)
      outcomes[outcome] += not skip
  assert outcomes["refused"] >= 8, outcomes
  assert outcomes["same"] + outcomes["changed"] >= 4, outcomes


def test_fuzz_batched_route_logs(tmp_path):
  """Batched logs (one file per layer): imported events are original events,
  in order, and a lost one is counted. Batched rows have no request
  identity, so a flip inside a number may make one event differ, and a
  row that splits or merges steps (repeated, swapped, deleted, or a flipped
  token_idx) may pair steps of the layers wrongly (step patterns are
  matched by difflib): the report's notes must then say that steps look
  damaged."""
  trace = synthetic.uniform(2, 8, 2, 6, 4, 3, seed=12)  # 8 steps of 3
  starts = np.unique(trace.step, return_index=True)[1]
  row = np.arange(trace.num_tokens) - starts[np.searchsorted(
      starts, np.arange(trace.num_tokens), side="right") - 1]
  files = {}
  for layer in range(2):
    rows = [{"type": "meta", "num_experts": 8, "top_k": 2}] + [
        _route("run", row[i], layer, trace.ids[i, layer],
               trace.weights[i, layer]) for i in range(trace.num_tokens)]
    files[tmp_path / f"layer_{layer}.jsonl"] = "".join(
        json.dumps(r) + "\n" for r in rows).encode()

  def events(t, position):
    return [(int(p), i.tobytes(), w.tobytes())
            for p, i, w in zip(position, t.ids, t.weights)]

  want = {event: n for n, event in enumerate(events(trace, row))}
  rng = np.random.default_rng(13)
  refused = 0
  for trial in range(30):
    target = list(files)[trial % 2]
    kind = KINDS[rng.integers(len(KINDS))]
    for path, text in files.items():
      path.write_bytes(_mutate(text, kind, rng) if path == target else text)
    try:
      got, report = importers.import_vllm_routes(tmp_path, layout="batched")
    except ValueError as e:
      assert str(target) in str(e), (kind, str(e))
      refused += 1
      continue
    assert report.rows_read == report.rows_kept + report.mismatched_rows
    found = [want.get(event) for event in events(got, got.position)]
    known = [n for n in found if n is not None]
    assert known == sorted(known), kind
    foreign = len(found) - len(known)
    noted = any(" steps, layer " in note or "token_idx > 0" in note
                for note in report.notes)
    # Swapped rows of one token_idx in two steps trade their routing.
    allowed = {"flip": 1, "swap_lines": 2}.get(kind, 0)
    if kind != "truncate" and noted:  # damaged steps, said so
      allowed = len(found)
    assert foreign <= allowed, (kind, foreign, report.summary())
    lost = trace.num_tokens - len(known)
    if lost > foreign and kind != "truncate":
      assert report.mismatched_rows >= lost - foreign, (kind,
                                                        report.summary())
  assert refused >= 5, refused
