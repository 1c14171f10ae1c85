"""Tests of wisp_jax/models/safetensors_io.py, against the reference
`safetensors` library (numpy backend)."""

import json
import pathlib
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from wisp_jax.errors import LoadError, MissingFileError
from wisp_jax.models import safetensors_io
from wisp_jax.models.safetensors_io import SafetensorsCheckpoint, read_header
from tests.mutations import mutate

TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
           "b": np.linspace(-1, 1, 5).astype(np.float16),
           "c": np.array([[1.5, -2.0], [0.25, 8.0]]),
           "empty": np.zeros((0, 3), np.float32)}


def _save(path: pathlib.Path, tensors=None, metadata=None) -> pathlib.Path:
  safetensors.numpy.save_file(TENSORS if tensors is None else tensors, path,
                              metadata=metadata)
  return path


def _read_all(path: pathlib.Path) -> dict[str, np.ndarray]:
  ckpt = SafetensorsCheckpoint.__new__(SafetensorsCheckpoint)
  ckpt.tensors, ckpt._last = read_header(path), None
  return {name: np.array(ckpt.read(name)) for name in ckpt.tensors}


def _with_header(path: pathlib.Path, edit) -> pathlib.Path:
  """Rewrites the JSON header of the safetensors file `path` with `edit`."""
  data = path.read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  header = edit(json.loads(data[8:8 + size]))
  raw = (header if isinstance(header, bytes) else
         json.dumps(header).encode())
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
  return path


def _assert_same(got: dict, want: dict) -> None:
  assert got.keys() == want.keys()
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_reads_what_the_reference_writes(tmp_path):
  path = _save(tmp_path / "m.safetensors", metadata={"format": "pt"})
  _assert_same(_read_all(path), TENSORS)
  assert read_header(path)["a"].nbytes == 48


def test_overlapping_offsets_are_refused(tmp_path):
  # b's data offsets made to cover a's bytes: the reference refuses it.
  def overlap(header):
    header["b"]["data_offsets"] = [0, 10]
    return header
  path = _with_header(_save(tmp_path / "m.safetensors"), overlap)
  with pytest.raises(safetensors.SafetensorError):
    safetensors.numpy.load(path.read_bytes())
  with pytest.raises(LoadError, match=r"tensor '\w+' \(bytes \d+\.\.\d+\) "
                     "overlaps tensor") as e:
    read_header(path)
  assert str(path) in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [
        h["a"]["data_offsets"][0], h["a"]["data_offsets"][1] - 4]},
                "junk": {"dtype": "F32", "shape": [1], "data_offsets": [
                    h["a"]["data_offsets"][1] - 4, h["a"]["data_offsets"][1]]
                         }}, "needs 48 bytes"),
    (lambda h: {k: v for k, v in h.items() if k != "c"},
     r"bytes \d+\.\.\d+ of the data belong to no tensor|follow the last"),
    (lambda h: b'["not", "an", "object"]', "not a JSON object"),
    (lambda h: {**h, "a": [1, 2]}, "tensor 'a' has header entry"),
    (lambda h: {**h, "a": {"shape": [3, 4], "data_offsets": [0, 48]}},
     r"tensor 'a' lacks \['dtype'\]"),
    (lambda h: {**h, "a": {**h["a"], "shape": "3x4"}},
     "tensor 'a' has shape '3x4'"),
    (lambda h: {**h, "a": {**h["a"], "dtype": 32}}, "tensor 'a' has dtype 32"),
    (lambda h: {**h, "a": {**h["a"], "data_offsets": [48, 0]}},
     "tensor 'a' has data_offsets"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__"),
    (lambda h: b'{"a": 1, "a": 2}', "names \\['a'\\] twice"),
    (lambda h: b'{"a": \xff}', "header is not JSON"),
])
def test_malformed_headers_name_the_file_and_tensor(tmp_path, edit, message):
  path = _with_header(_save(tmp_path / "m.safetensors"), edit)
  with pytest.raises(LoadError, match=message) as e:
    read_header(path)
  assert str(path) in str(e.value)


def test_short_truncated_and_padded_files(tmp_path):
  path = _save(tmp_path / "m.safetensors")
  data = path.read_bytes()
  for cut, message in ((3, "shorter than the 8-byte"),
                       (len(data) - 1, "is truncated: tensor"),
                       (20, "header of")):
    path.write_bytes(data[:cut])
    with pytest.raises(LoadError, match=message):
      read_header(path)
  path.write_bytes(data + b"\0" * 4)
  with pytest.raises(LoadError, match="4 bytes follow the last tensor"):
    read_header(path)


def _write_sharded(directory: pathlib.Path, weight_map=None) -> pathlib.Path:
  """Two shards: a, b in shard 1; c, empty in shard 2 (transformers' index
  layout)."""
  directory.mkdir(exist_ok=True)
  names = ("model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors")
  _save(directory / names[0], {k: TENSORS[k] for k in ("a", "b")})
  _save(directory / names[1], {k: TENSORS[k] for k in ("c", "empty")})
  if weight_map is None:
    weight_map = {"a": names[0], "b": names[0], "c": names[1],
                  "empty": names[1]}
  index = {"metadata": {"total_size": 106}, "weight_map": weight_map}
  (directory / safetensors_io.INDEX_FILE).write_text(
      json.dumps(index, indent=2, sort_keys=True) + "\n")
  return directory / safetensors_io.INDEX_FILE


def _checkpoint_contents(directory: pathlib.Path) -> dict:
  ckpt = SafetensorsCheckpoint(directory)
  return {name: (info.file.name, info.dtype, info.shape,
                 np.array(ckpt.read(name)).tobytes())
          for name, info in ckpt.tensors.items()}


def test_sharded_index_is_honoured(tmp_path):
  _write_sharded(tmp_path)
  ckpt = SafetensorsCheckpoint(tmp_path)
  assert ckpt.source == tmp_path / safetensors_io.INDEX_FILE
  assert {n: i.file.name[:11] for n, i in ckpt.tensors.items()} == {
      "a": "model-00001", "b": "model-00001", "c": "model-00002",
      "empty": "model-00002"}
  for name in TENSORS:
    np.testing.assert_array_equal(ckpt.read(name), TENSORS[name])


def test_tensor_in_two_shards_is_refused(tmp_path):
  # Shard 2 holds a second copy of `a`: before, the last shard read won.
  index = _write_sharded(tmp_path)
  shard2 = tmp_path / "model-00002-of-00002.safetensors"
  _save(shard2, {"c": TENSORS["c"], "empty": TENSORS["empty"],
                 "a": np.zeros((3, 4), np.float32)})
  with pytest.raises(LoadError, match="maps tensor 'a' to shard model-00001"
                     ".*but shard model-00002-of-00002.safetensors holds it"
                     ) as e:
    SafetensorsCheckpoint(tmp_path)
  assert e.value.file == str(index) and e.value.field == "a"


def test_weight_map_must_match_the_shards(tmp_path):
  names = ("model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors")
  # `c` mapped to the wrong shard; then a tensor no shard holds.
  _write_sharded(tmp_path, {"a": names[0], "b": names[0], "c": names[0],
                            "empty": names[1]})
  with pytest.raises(LoadError, match="maps tensor 'c' to shard "
                     "model-00001.*but shard model-00002"):
    SafetensorsCheckpoint(tmp_path)
  _write_sharded(tmp_path, {"a": names[0], "b": names[0], "c": names[1],
                            "empty": names[1], "d": names[1]})
  with pytest.raises(LoadError, match="maps tensor 'd' to shard model-00002"
                     ".*which does not hold it"):
    SafetensorsCheckpoint(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "absolute",
                                   "sub/inner.safetensors", "..", ""])
def test_index_entries_outside_the_directory_are_refused(tmp_path, shard):
  # Before, "../outside.safetensors" was read from outside the directory.
  model = tmp_path / "model"
  _write_sharded(model)
  _save(tmp_path / "outside.safetensors", {"a": TENSORS["a"]})
  if shard == "absolute":
    shard = str(tmp_path / "outside.safetensors")
  index = json.loads((model / safetensors_io.INDEX_FILE).read_text())
  index["weight_map"]["a"] = shard
  (model / safetensors_io.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(LoadError, match="not a plain file name.*refusing to "
                     "read outside the model directory") as e:
    SafetensorsCheckpoint(model)
  assert str(model / safetensors_io.INDEX_FILE) in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"weight_map": ', "not valid JSON"),
    ('["weight_map"]', "no 'weight_map'"),
    ('{"weight_map": ["a"]}', "no 'weight_map'"),
    ('{"weight_map": {"a": 7}}', "shard 7, which is not a plain file name"),
])
def test_index_structure_errors_name_the_index(tmp_path, text, message):
  index = _write_sharded(tmp_path)
  index.write_text(text)
  with pytest.raises(LoadError, match=message) as e:
    SafetensorsCheckpoint(tmp_path)
  assert str(index) in str(e.value)
  index.write_bytes(b'{"weight_map": {"a": "\xff"}}')
  with pytest.raises(LoadError, match="not UTF-8"):
    SafetensorsCheckpoint(tmp_path)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(MissingFileError, match="holds no model.safetensors"):
    SafetensorsCheckpoint(tmp_path)
  _write_sharded(tmp_path)
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002"
                     ".safetensors, which is missing"):
    SafetensorsCheckpoint(tmp_path)


# ---------------------------------------------------------------- fuzzing


def _mutations(data: bytes, rng: np.random.Generator, count: int,
               region: int | None = None):
  """(kind, mutated bytes): truncations, bit flips, bad UTF-8, repeated
  and swapped lines, appended bytes. Flips and bad bytes fall in the first
  `region` bytes if given."""
  kinds = ["truncate", "flip", "flip", "bad_utf8", "append"]
  if len(data.split(b"\n")) > 3:
    kinds += ["repeat_line", "swap_lines"]
  for _ in range(count):
    kind = kinds[rng.integers(len(kinds))]
    yield kind, mutate(data, kind, rng, region)


def test_fuzz_safetensors_file(tmp_path):
  """Every mutated file loads what the reference library loads from it, or
  is refused with a LoadError naming it; whatever the reference refuses is
  refused too."""
  original = _save(tmp_path / "original.safetensors").read_bytes()
  rng = np.random.default_rng(0)
  outcomes = {"same as reference": 0, "refused": 0}
  for trial, (kind, data) in enumerate(_mutations(original, rng, 60)):
    path = tmp_path / f"m{trial}.safetensors"
    path.write_bytes(data)
    try:
      want = safetensors.numpy.load(data)
    except Exception:  # the reference refuses: pylint: disable=broad-except
      want = None
    try:
      got = _read_all(path)
    except LoadError as e:
      assert str(path) in str(e), (kind, str(e))
      outcomes["refused"] += 1
      continue
    assert want is not None, f"{kind}: accepted what the reference refuses"
    _assert_same(got, want)
    outcomes["same as reference"] += 1
  assert min(outcomes.values()) >= 5, outcomes


def test_fuzz_sharded_index(tmp_path):
  """Every mutated index.json loads the original checkpoint or is refused
  with a LoadError (or MissingFileError) naming the index."""
  index = _write_sharded(tmp_path)
  original_text = index.read_bytes()
  want = _checkpoint_contents(tmp_path)
  rng = np.random.default_rng(1)
  refused = 0
  for kind, data in _mutations(original_text, rng, 60):
    index.write_bytes(data)
    try:
      got = _checkpoint_contents(tmp_path)
    except LoadError as e:
      assert str(index) in str(e), (kind, str(e))
      refused += 1
      continue
    assert got == want, (kind, data)
  assert 10 <= refused < 60
