"""Tests of wisp_jax/traces/trace.py."""

import re
import types

import numpy as np
import pytest

from wisp_jax.errors import LoadError
from wisp_jax.models.config import get_config
from wisp_jax.traces import trace as trace_lib
from wisp_jax.traces.trace import DECODE, PREFILL, RoutingTrace


def _tiny_trace() -> RoutingTrace:
  # 4 events, L=2, K=2, E=5: step 0 has two tokens, steps 1 and 3 one each.
  ids = np.array([[[0, 1], [2, 3]],
                  [[1, 4], [3, 2]],
                  [[4, 0], [0, 1]],
                  [[2, 3], [2, 4]]])
  weights = np.full(ids.shape, 0.5, np.float32)
  return RoutingTrace(step=[0, 0, 1, 3], request=[0, 1, 0, 1],
                      phase=[PREFILL, PREFILL, DECODE, DECODE],
                      position=[0, 0, 1, 1], ids=ids, weights=weights,
                      num_experts=5, model="toy", source="hand")


def test_sizes_and_dtypes():
  t = _tiny_trace()
  assert (t.num_tokens, t.num_layers, t.top_k) == (4, 2, 2)
  assert t.num_events == 8
  assert t.num_steps == 3
  assert t.ids.dtype == np.int16 and t.weights.dtype == np.float32
  assert trace_lib.id_dtype(40000) == np.int32


def test_steps_groups_events_by_step():
  groups = list(_tiny_trace().steps())
  assert [(g.step, g.start, g.stop) for g in groups] == [(0, 0, 2), (1, 2, 3),
                                                         (3, 3, 4)]
  assert np.array_equal(groups[0].request, [0, 1])
  assert np.array_equal(groups[2].ids, [[[2, 3], [2, 4]]])


def test_per_layer_needed_is_union_over_tokens():
  needed = _tiny_trace().per_layer_needed(0)
  assert np.array_equal(needed[0], [0, 1, 4])
  assert np.array_equal(needed[1], [2, 3])
  with pytest.raises(ValueError, match="step 2 has no events"):
    _tiny_trace().per_layer_needed(2)


def test_needed_masks_skip_empty_steps():
  masks = _tiny_trace().needed_masks()
  assert masks.shape == (3, 2, 5)
  expected_layer0 = [[1, 1, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 1, 1, 0]]
  assert np.array_equal(masks[:, 0], np.array(expected_layer0, bool))
  assert np.array_equal(masks[2, 1], [False, False, True, False, True])


def test_save_load_round_trip(tmp_path):
  t = _tiny_trace()
  t.save(tmp_path / "t.npz")
  back = RoutingTrace.load(tmp_path / "t.npz")
  for name in ("step", "request", "phase", "position", "ids", "weights"):
    assert np.array_equal(getattr(back, name), getattr(t, name)), name
    assert getattr(back, name).dtype == getattr(t, name).dtype, name
  assert (back.num_experts, back.model, back.source) == (5, "toy", "hand")


def _fields(t):
  return dict(schema_version=np.int64(1), num_experts=np.int64(5),
              top_k=np.int64(2), num_layers=np.int64(2), model=np.str_("m"),
              source=np.str_("s"), step=t.step, request=t.request,
              phase=t.phase, position=t.position, ids=t.ids,
              weights=t.weights)


@pytest.mark.parametrize("change, message", [
    (dict(ids=np.where(_tiny_trace().ids == 4, 5, _tiny_trace().ids)
          .astype(np.int16)), r"'ids': values must lie in \[0, 5\)"),
    (dict(top_k=np.int64(3)), "'top_k': says 3"),
    (dict(num_layers=np.int64(1)), "'num_layers': says 1"),
    (dict(step=np.array([0, 1, 0, 3])), "'step': must be non-decreasing"),
    (dict(weights=np.zeros((4, 2, 2))), "'weights': dtype must be float32"),
    (dict(ids=np.zeros((4, 2, 2), np.int64)), "'ids': dtype must be int16"),
    (dict(position=np.zeros(3, np.int64)), "'position': shape"),
    (dict(schema_version=np.int64(7)), "'schema_version': is 7"),
    (dict(phase=np.array([0, 1, 2, 1], np.int8)), "'phase': values"),
])
def test_load_rejects_bad_fields(tmp_path, change, message):
  fields = _fields(_tiny_trace())
  fields.update(change)
  np.savez_compressed(tmp_path / "bad.npz", **fields)
  with pytest.raises(ValueError, match=message) as info:
    RoutingTrace.load(tmp_path / "bad.npz")
  assert "bad.npz" in str(info.value)


def test_load_rejects_missing_field(tmp_path):
  fields = _fields(_tiny_trace())
  del fields["weights"]
  np.savez_compressed(tmp_path / "bad.npz", **fields)
  with pytest.raises(ValueError, match="'weights': missing"):
    RoutingTrace.load(tmp_path / "bad.npz")


def test_constructor_checks_range_before_narrowing():
  t = _tiny_trace()
  # 65537 would wrap to 1 as int16; it must be caught first.
  bad = np.array(t.ids, np.int64)
  bad[0, 0, 0] = 65537
  with pytest.raises(ValueError, match="values must lie"):
    RoutingTrace(step=t.step, request=t.request, phase=t.phase,
                 position=t.position, ids=bad, weights=t.weights,
                 num_experts=5)
  repeated = np.array(t.ids)
  repeated[1, 0] = [3, 3]
  with pytest.raises(ValueError, match="event 1 repeats an expert"):
    RoutingTrace(step=t.step, request=t.request, phase=t.phase,
                 position=t.position, ids=repeated, weights=t.weights,
                 num_experts=5)


def _fake_generate_output():
  # B=2 rows, prompt lengths 3 and 1 (row 1 left-padded by 2), P=3, L=1,
  # K=2, then 2 decode steps. Routing value = 10 * row + column for easy
  # reading; padded columns carry a marker expert pair (8, 9).
  prefill = np.array([[[[0, 1], [2, 3], [4, 5]],
                       [[8, 9], [8, 9], [6, 7]]]], np.int32)  # [L,B,P,K]
  decode1 = np.array([[[[1, 2]], [[3, 4]]]], np.int32)  # [L,B,1,K]
  decode2 = np.array([[[[5, 6]], [[7, 0]]]], np.int32)
  ids = [prefill, decode1, decode2]
  weights = [np.full(i.shape, 0.25, np.float32) for i in ids]
  return types.SimpleNamespace(routing_ids=ids, routing_weights=weights,
                               prompt_lengths=np.array([3, 1], np.int32))


def test_from_generate_drops_padding_and_numbers_positions():
  config = get_config("tiny").replace(num_layers=1, num_experts=10)
  t = trace_lib.from_generate(_fake_generate_output(), config,
                              request_ids=[7, 9])
  assert np.array_equal(t.step, [0, 0, 0, 0, 1, 1, 2, 2])
  assert np.array_equal(t.request, [7, 7, 7, 9, 7, 9, 7, 9])
  assert np.array_equal(t.phase, [0, 0, 0, 0, 1, 1, 1, 1])
  assert np.array_equal(t.position, [0, 1, 2, 0, 3, 1, 4, 2])
  assert np.array_equal(t.ids[:, 0], [[0, 1], [2, 3], [4, 5], [6, 7], [1, 2],
                                      [3, 4], [5, 6], [7, 0]])
  assert t.num_experts == 10 and t.model == "tiny"


def test_from_generate_errors_name_the_fix():
  config = get_config("tiny")
  out = _fake_generate_output()
  out.routing_ids = None
  with pytest.raises(ValueError, match="record_routing=True"):
    trace_lib.from_generate(out, config)
  with pytest.raises(ValueError, match=r"expected \[L=2, B, T, K=2\]"):
    trace_lib.from_generate(_fake_generate_output(), config)


def test_from_generate_on_the_real_generate_loop():
  # The recorder against the real GenerateOutput of the tiny model.
  from wisp_jax.models.transformer import MoEModel
  from wisp_jax.serving.generate import generate
  config = get_config("tiny")
  model = MoEModel(config)
  out = generate(model, [[1, 2, 3], [4]], max_new_tokens=3,
                 record_routing=True)
  t = trace_lib.from_generate(out, config)
  assert t.num_tokens == 4 + 2 * 2
  assert np.array_equal(t.step, [0, 0, 0, 0, 1, 1, 2, 2])
  assert np.array_equal(t.position, [0, 1, 2, 0, 3, 1, 4, 2])
  # Row 1's only prompt token is the prefill's last column.
  assert np.array_equal(t.ids[3], np.asarray(out.routing_ids[0])[:, 1, 2])
  assert np.array_equal(t.ids[7], np.asarray(out.routing_ids[2])[:, 1, 0])


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable RoutingTrace .npz"),
    (b"step,request\n0,1\n", "not a readable RoutingTrace .npz"),
    (None, "it holds one .npy array"),
])
def test_load_refuses_empty_and_non_npz_files(tmp_path, content, message):
  # Before: EOFError (empty file) or AttributeError (a .npy), no file named.
  path = tmp_path / "t.npz"
  if content is None:
    with open(path, "wb") as f:
      np.save(f, np.arange(3))
  else:
    path.write_bytes(content)
  with pytest.raises(LoadError, match=re.escape(message)) as info:
    RoutingTrace.load(path)
  assert info.value.file == str(path) and str(path) in str(info.value)


def test_load_refuses_missing_file_and_bad_scalars(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such RoutingTrace file"):
    RoutingTrace.load(tmp_path / "nope.npz")
  for change, message in ((dict(num_experts=np.arange(3)),
                           "'num_experts': must be one integer"),
                          (dict(schema_version=np.str_("1")),
                           "'schema_version': must be one integer"),
                          (dict(model=np.arange(2)),
                           "'model': must be one string")):
    fields = _fields(_tiny_trace())
    fields.update(change)
    np.savez_compressed(tmp_path / "bad.npz", **fields)
    with pytest.raises(LoadError, match=message):  # before: TypeError
      RoutingTrace.load(tmp_path / "bad.npz")
