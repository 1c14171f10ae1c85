"""Tests of wisp_jax/traces/importers.py."""

import dataclasses
import gzip
import json
import re

import numpy as np
import pytest

from wisp_jax.traces import importers, synthetic
from wisp_jax.traces.trace import RoutingTrace


def _row_in_step(trace: RoutingTrace) -> np.ndarray:
  """Each event's row inside its forward batch."""
  starts = np.unique(trace.step, return_index=True)[1]
  first = starts[np.searchsorted(starts, np.arange(trace.num_tokens),
                                 side="right") - 1]
  return np.arange(trace.num_tokens) - first


def _route(req, token, layer, ids, weights):
  return {"type": "route", "req_id": req, "token_idx": int(token),
          "layer": layer, "topk_ids": [int(i) for i in ids],
          "topk_weights": [float(w) for w in weights]}


def _write(path, rows):
  with open(path, "w") as f:
    f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                    for r in rows))
  return str(path)


def _write_batched(tmp_path, trace, skip=(), warmup_steps=0, warmup_sets=None,
                   meta=True):
  """One file per layer, constant req_id, token_idx = row in the batch."""
  rows_in_step = _row_in_step(trace)
  paths = []
  for layer in range(trace.num_layers):
    rows = [{"type": "meta", "num_experts": trace.num_experts,
             "top_k": trace.top_k, "model": "toy"}] if meta else []
    for _ in range(warmup_steps):  # identical dummy tokens, skewed weights
      rows += [_route("run", t, layer, warmup_sets[layer], [0.9, 0.1])
               for t in range(4)]
    rows += [_route("run", rows_in_step[i], layer, trace.ids[i, layer],
                    trace.weights[i, layer])
             for i in range(trace.num_tokens) if (layer, i) not in skip]
    paths.append(_write(tmp_path / f"layer_{layer}.jsonl", rows))
  return paths


def _assert_same_events(got: RoutingTrace, want: RoutingTrace):
  assert np.array_equal(got.ids, want.ids)
  assert np.array_equal(got.weights, want.weights)


def _varied_trace():
  # 5 requests in waves of 3: four steps of 3 events, then four of 2.
  return synthetic.uniform(3, 8, 2, 5, 4, 3, seed=3)


def test_batched_constant_req_id_recovers_steps(tmp_path):
  trace = _varied_trace()
  _write_batched(tmp_path, trace)
  got, report = importers.import_vllm_routes(tmp_path / "layer_*.jsonl")
  assert report.layout == "batched"
  assert np.array_equal(got.step, trace.step)
  assert np.array_equal(got.position, _row_in_step(trace))
  assert np.all(got.request == 0) and report.request_ids == {0: "run"}
  _assert_same_events(got, trace)
  assert (report.mismatched_rows, report.unmatched_steps) == (0, 0)
  assert report.layer_ids == (0, 1, 2) and got.model == "toy"
  assert got.num_experts == 8 and not report.num_experts_inferred


def test_per_request_layout_in_one_file(tmp_path):
  trace = _varied_trace()
  rows = [_route(f"req-{trace.request[i]}", trace.position[i], layer,
                 trace.ids[i, layer], trace.weights[i, layer])
          for i in range(trace.num_tokens) for layer in range(3)]
  got, report = importers.import_vllm_routes(
      _write(tmp_path / "all.jsonl", rows), num_experts=8)
  assert report.layout == "per_request"
  assert np.array_equal(got.step, np.arange(trace.num_tokens))
  assert np.array_equal(got.request, trace.request)
  assert np.array_equal(got.position, trace.position)
  assert report.request_ids == {r: f"req-{r}" for r in range(5)}
  _assert_same_events(got, trace)


def test_drop_warmup_detects_the_run_of_identical_sets(tmp_path):
  trace = _varied_trace()
  # The warm-up set equals each layer's first real set, so the run spills
  # into the first real step; it must be cut at the step boundary.
  sets = [trace.ids[0, layer] for layer in range(3)]
  _write_batched(tmp_path, trace, warmup_steps=30, warmup_sets=sets)
  got, report = importers.import_vllm_routes(tmp_path, drop_warmup=True)
  assert report.warmup_rows_dropped == 30 * 4 * 3
  assert np.array_equal(got.step, trace.step)
  _assert_same_events(got, trace)
  kept, report = importers.import_vllm_routes(tmp_path)
  assert report.warmup_rows_dropped == 0
  assert kept.num_steps == trace.num_steps + 30
  short, report = importers.import_vllm_routes(tmp_path, drop_warmup=True,
                                               min_warmup_rows=200)
  assert report.warmup_rows_dropped == 0 and short.num_steps == 38


def test_per_layer_files_with_dropped_rows(tmp_path):
  trace = _varied_trace()
  # Event 4 is row 1 of step 1; event 9 is row 0 of step 3.
  _write_batched(tmp_path, trace, skip={(1, 4), (2, 9)})
  got, report = importers.import_vllm_routes(tmp_path)
  keep = ~np.isin(np.arange(trace.num_tokens), [4, 9])
  assert np.array_equal(got.step, trace.step[keep])
  _assert_same_events(got, trace.select(keep))
  assert report.mismatched_rows == 4  # the other two layers' rows, twice
  assert report.rows_per_layer == {0: 20, 1: 19, 2: 19}
  assert report.unmatched_steps == 0


def test_a_layer_that_lost_a_whole_step_is_not_misaligned(tmp_path):
  base = synthetic.uniform(2, 8, 2, 11, 1, 11, seed=5)
  trace = dataclasses.replace(base, step=[0, 0, 0, 1, 1, 2, 3, 3, 3, 4, 4])
  _write_batched(tmp_path, trace, skip={(1, 5)})  # step 2 has one row
  got, report = importers.import_vllm_routes(tmp_path)
  keep = np.arange(11) != 5
  _assert_same_events(got, trace.select(keep))
  assert np.array_equal(got.step, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
  assert report.unmatched_steps == 1 and report.mismatched_rows == 1


def _per_token_rows(trace, key="problem_id", name=lambda r: int(r)):
  return [{key: name(trace.request[i]), "layer": layer,
           "token_idx": int(trace.position[i]),
           "experts": [int(e) for e in trace.ids[i, layer]],
           "gating_probs": [float(w) for w in trace.weights[i, layer]]}
          for i in range(trace.num_tokens) for layer in range(trace.num_layers)]


@pytest.mark.parametrize("key, name, layers", [
    ("problem_id", int, 2), ("request_id", lambda r: f"q{r}", 2),
    ("problem_id", int, 1)])
def test_per_token_rows_in_any_order(tmp_path, key, name, layers):
  trace = synthetic.sticky(layers, 8, 2, 3, 5, 2, seed=1)
  rows = _per_token_rows(trace, key, name)
  order = np.random.default_rng(0).permutation(len(rows))
  path = tmp_path / "tokens.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("".join(json.dumps(rows[i]) + "\n" for i in order))
  got, report = importers.import_per_token(path, num_experts=8)
  by_time = np.lexsort((trace.position, trace.request))
  assert np.array_equal(got.step, np.arange(trace.num_tokens))
  assert np.array_equal(got.request, trace.request[by_time])
  assert np.array_equal(got.position, trace.position[by_time])
  assert np.array_equal(got.ids, trace.ids[by_time])
  assert np.array_equal(got.weights, trace.weights[by_time])
  assert report.request_ids == {r: name(r) for r in range(3)}


GOOD = [_route(0, t, 0, [t, t + 1], [0.6, 0.4]) for t in range(3)]
BAD_VLLM = [
    ("{not json", "not valid JSON"),
    ({k: v for k, v in GOOD[0].items() if k != "topk_weights"},
     "missing field"),
    (_route(0, 5, 0, [1, 2, 3], [0.5, 0.3, 0.2]), "expected top_k=2"),
    (_route(0, 5, 0, [1, 8], [0.5, 0.5]), r"outside [0, 8)"),
    (_route(0, 5, 0, [3, 3], [0.5, 0.5]), "repeats an expert"),
    ({**_route(0, 5, 0, [1, 2], [0, 0]), "topk_weights": ["a", 1]},
     "finite numbers"),
    (_route(0, 5, -1, [1, 2], [0.5, 0.5]), "layer -1"),
    ({"type": "stats", "n": 1}, "unknown row type 'stats'"),
    ([1, 2], "not a JSON object"),
]


@pytest.mark.parametrize("bad, message, layout", [
    *[(bad, message, "auto") for bad, message in BAD_VLLM],
    # Auto would read a repeated token as a new batched step.
    (_route(0, 1, 0, [4, 5], [0.5, 0.5]), "repeats request 0 token 1",
     "per_request")])
def test_malformed_vllm_rows_name_file_and_line(tmp_path, bad, message,
                                                layout):
  meta = {"type": "meta", "num_experts": 8, "top_k": 2}
  path = _write(tmp_path / "routes.jsonl", [meta, GOOD[0], GOOD[1], bad,
                                            GOOD[2]])
  with pytest.raises(ValueError, match=re.escape(f"{path}:4")) as info:
    importers.import_vllm_routes(path, layout=layout)
  assert re.search(re.escape(message), str(info.value))
  got, report = importers.import_vllm_routes(path, skip_malformed=True,
                                             layout=layout)
  assert report.layout == "per_request"
  assert report.malformed_skipped == 1
  assert np.array_equal(got.position, [0, 1, 2])
  assert np.array_equal(got.ids[:, 0], [[0, 1], [1, 2], [2, 3]])


def test_malformed_per_token_rows(tmp_path):
  trace = synthetic.uniform(1, 8, 2, 1, 3, 1)
  rows = _per_token_rows(trace)
  missing = {k: v for k, v in rows[0].items() if k != "problem_id"}
  path = _write(tmp_path / "t.jsonl", rows + [missing, rows[1]])
  with pytest.raises(ValueError, match=re.escape(f"{path}:4: missing field"
                                                 "(s) ['problem_id or")):
    importers.import_per_token(path)
  got, report = importers.import_per_token(path, skip_malformed=True)
  assert report.malformed_skipped == 2  # the missing id, the duplicate
  assert "t.jsonl:5: repeats request 0 token 1" in report.malformed_examples[1]
  _assert_same_events(got, trace)


def test_metadata_conflicts_and_inference(tmp_path):
  trace = synthetic.uniform(2, 8, 2, 2, 3, 2)
  _write_batched(tmp_path, trace, meta=False)
  got, report = importers.import_vllm_routes(tmp_path)
  assert report.num_experts_inferred
  assert got.num_experts == int(trace.ids.max()) + 1
  _write_batched(tmp_path, trace)
  with pytest.raises(ValueError, match="metadata says num_experts=8"):
    importers.import_vllm_routes(tmp_path, num_experts=16)
  with pytest.raises(ValueError, match="names no files"):
    importers.import_vllm_routes(tmp_path / "nope.jsonl")


# ------------------------------------------------- damaged logs


def _per_request_lines(trace, meta=True):
  """One file, all layers: JSON lines of a per-request log of `trace`."""
  lines = [json.dumps({"type": "meta", "num_experts": trace.num_experts,
                       "top_k": trace.top_k})] if meta else []
  return lines + [json.dumps(_route(f"req-{trace.request[i]}",
                                    trace.position[i], layer,
                                    trace.ids[i, layer],
                                    trace.weights[i, layer]))
                  for i in range(trace.num_tokens)
                  for layer in range(trace.num_layers)]


def _sixty_events():
  # 6 requests of 10 tokens in waves of 3, L=3: 60 events, 180 rows.
  return synthetic.uniform(3, 8, 2, 6, 10, 3, seed=7)


def _line_of(lines, request, token, layer):
  """0-based index of the row of (request, token, layer) in `lines`."""
  return next(i for i, line in enumerate(lines) if (lambda r: (
      r.get("req_id"), r.get("token_idx"), r.get("layer")))(json.loads(line))
              == (f"req-{request}", token, layer))


def _assert_accounted(report):
  assert report.rows_read == (report.rows_kept + report.warmup_rows_dropped
                              + report.mismatched_rows), report.summary()
  assert report.rows_kept == report.events * len(report.layer_ids)


def test_one_duplicated_line_does_not_make_a_per_request_log_batched(
    tmp_path):
  # Before: auto read the log as batched, 60 events became 40, no error.
  trace = _sixty_events()
  lines = _per_request_lines(trace)
  i = _line_of(lines, 0, 3, 0)
  path = _write(tmp_path / "dup.jsonl", lines[:i + 1] + lines[i:])
  with pytest.raises(ValueError, match=re.escape(
      f"{path}:{i + 2}: repeats request 0 token 3 of the same layer "
      "(layout='auto' read the log as per-request")):
    importers.import_vllm_routes(path)
  got, report = importers.import_vllm_routes(path, skip_malformed=True)
  assert report.layout == "per_request" and report.malformed_skipped == 1
  _assert_same_events(got, trace)
  assert np.array_equal(got.position, trace.position)
  assert (report.events, report.rows_read, report.lines_read) == (60, 180,
                                                                   182)
  _assert_accounted(report)
  assert "layout 'auto' chose per_request" in report.notes[0]


def test_one_swapped_line_pair_is_a_malformed_row(tmp_path):
  trace = _sixty_events()
  lines = _per_request_lines(trace)
  i, j = _line_of(lines, 1, 4, 2), _line_of(lines, 1, 5, 2)
  lines[i], lines[j] = lines[j], lines[i]
  path = _write(tmp_path / "swap.jsonl", lines)
  with pytest.raises(ValueError, match=re.escape(f"{path}:") +
                     rf"({i + 1}|{j + 1}): token_idx [45] of request 1 "
                     "comes after token_idx [345] in this layer: out of "
                     "time order"):
    importers.import_vllm_routes(path)
  got, report = importers.import_vllm_routes(path, skip_malformed=True)
  assert report.layout == "per_request"
  # One of the two rows is dropped, so its token loses layer 2: 59 events.
  lost = np.flatnonzero((trace.request == 1) & np.isin(trace.position,
                                                       [4, 5]))
  keep = [np.delete(np.arange(60), k) for k in lost]
  assert any(np.array_equal(got.ids, trace.ids[k]) for k in keep)
  assert (report.malformed_skipped, report.mismatched_rows) == (1, 2)
  _assert_accounted(report)


def test_batched_layout_still_detected(tmp_path):
  trace = _varied_trace()  # 8 steps: 7 restarts to 0 in every layer
  _write_batched(tmp_path, trace)
  _, report = importers.import_vllm_routes(tmp_path)
  assert report.layout == "batched"
  assert "restarts within a request 21 time(s) (21 at 0)" in report.notes[0]


def test_truncation_at_a_line_end_is_reported(tmp_path):
  trace = _sixty_events()
  lines = _per_request_lines(trace)
  # All layers in one file, the last row (layer 2 of the last token) lost.
  path = _write(tmp_path / "one.jsonl", lines[:-1])
  got, report = importers.import_vllm_routes(path)
  _assert_same_events(got, trace.select(np.arange(59)))
  assert report.mismatched_rows == 2
  _assert_accounted(report)
  assert any(note.startswith("layer 2's rows of 1 request(s) stop before "
                             "the other layers' (request 'req-5' ends at "
                             f"token_idx 8 here, at 9 elsewhere; the layer's "
                             f"last row is {path}:178)") for note in
             report.notes), report.notes
  # A cut between two tokens leaves a well-formed shorter log: undetectable.
  got, report = importers.import_vllm_routes(
      _write(tmp_path / "cut.jsonl", lines[:-3]))
  _assert_same_events(got, trace.select(np.arange(59)))
  assert report.mismatched_rows == 0 and len(report.notes) == 1


def test_truncated_layer_file_is_reported_in_batched_logs(tmp_path):
  trace = _varied_trace()  # the last step holds 2 events
  paths = _write_batched(tmp_path, trace)
  with open(paths[1]) as f:
    rows = f.read().splitlines()
  _write(paths[1], rows[:-1])  # layer 1 loses the last step's last row
  got, report = importers.import_vllm_routes(tmp_path)
  assert got.num_tokens == trace.num_tokens - 1
  assert any(f"layer 1's last step has 1 of 2 rows (its last row is "
             f"{paths[1]}:20)" in note for note in report.notes)
  _write(paths[1], rows[:-2])  # ... and the whole last step
  got, report = importers.import_vllm_routes(tmp_path)
  assert got.num_tokens == trace.num_tokens - 2
  assert any("layer 1 ends 1 step(s) before the other layers" in note
             for note in report.notes)
  assert report.unmatched_steps == 1
  _assert_accounted(report)


def test_undecodable_line_names_file_and_line(tmp_path):
  # Before: a raw UnicodeDecodeError, even with skip_malformed=True.
  trace = _sixty_events()
  lines = [line.encode() for line in _per_request_lines(trace)]
  lines[7] = lines[7].replace(b'"route"', b'"r\xe9oute"')
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(ValueError, match=re.escape(
      f"{path}:8: not valid UTF-8 (byte 0xe9 at column 12)")):
    importers.import_vllm_routes(path)
  got, report = importers.import_vllm_routes(path, skip_malformed=True)
  assert report.malformed_skipped == 1 and got.num_tokens == 59
  assert report.malformed_examples == [
      f"{path}:8: not valid UTF-8 (byte 0xe9 at column 12)"]
  _assert_accounted(report)


def test_truncated_and_corrupt_gz_files(tmp_path):
  # Before: a raw EOFError / BadGzipFile, even with skip_malformed=True.
  trace = _sixty_events()
  data = gzip.compress(("\n".join(_per_request_lines(trace)) + "\n").encode())
  path = tmp_path / "routes.jsonl.gz"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=re.escape(f"{path}:") + r"\d+: the "
                     "compressed file ends early: it is truncated. Fix the "
                     "file"):
    importers.import_vllm_routes(path)
  got, report = importers.import_vllm_routes(path, skip_malformed=True)
  assert 0 < got.num_tokens < 60 and report.malformed_skipped == 1
  _assert_same_events(got, trace.select(np.arange(got.num_tokens)))
  corrupt = bytearray(data)
  corrupt[-6] ^= 0x10  # the CRC-32 of the member
  path.write_bytes(bytes(corrupt))
  with pytest.raises(ValueError, match="CRC check failed.*none of its rows "
                     "can be trusted"):
    importers.import_vllm_routes(path)
  other = _write(tmp_path / "more.jsonl", _per_request_lines(trace)[1:])
  got, report = importers.import_vllm_routes([path, other],
                                             skip_malformed=True)
  # Every row of the damaged file is dropped; the other file's are kept.
  assert report.malformed_skipped == 1 + 180
  _assert_same_events(got, trace)


def test_corrupt_layer_number_does_not_empty_the_trace(tmp_path):
  # Before: layer 7 with one row left no token in every layer: 0 events.
  trace = _sixty_events()
  lines = _per_request_lines(trace)
  i = _line_of(lines, 2, 6, 1)
  lines[i] = lines[i].replace('"layer": 1', '"layer": 7')
  path = _write(tmp_path / "flip.jsonl", lines)
  with pytest.raises(ValueError, match=re.escape(
      f"{path}:{i + 1}: layer 7 has 1 row(s), under a tenth of layer 0's "
      "60: a corrupt layer number")):
    importers.import_vllm_routes(path)
  got, report = importers.import_vllm_routes(path, skip_malformed=True)
  assert report.layer_ids == (0, 1, 2) and got.num_tokens == 59
  assert report.malformed_skipped == 1 and report.mismatched_rows == 2
  _assert_accounted(report)


def test_large_request_ids_keep_their_positions(tmp_path):
  # Before: request * (1 + max token) + token overflowed int64.
  big = 10 ** 15
  rows = [_route(big + r, t, 0, [t % 8, (t + 1) % 8], [0.5, 0.5])
          for r in range(2) for t in (0, 1, 2, 9999)]
  got, report = importers.import_vllm_routes(
      _write(tmp_path / "big.jsonl", rows), num_experts=8)
  assert np.array_equal(got.position, [0, 1, 2, 9999] * 2)
  assert np.array_equal(got.request, [big] * 4 + [big + 1] * 4)


def test_report_summary_says_what_was_dropped_and_why(tmp_path):
  trace = _varied_trace()
  _write_batched(tmp_path, trace, skip={(1, 4)})
  _, report = importers.import_vllm_routes(tmp_path)
  assert report.dropped() == {"malformed (skipped)": 0, "warm-up": 0,
                              "no counterpart in every layer": 2}
  assert report.summary().splitlines()[0] == (
      "batched log, 3 file(s), 62 lines: 59 well-formed route rows; kept "
      "19 events x 3 layers = 57 rows; dropped: 2 no counterpart in every "
      "layer.")
