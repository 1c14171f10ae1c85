"""A small, strict reader of (possibly sharded) safetensors checkpoints.

The format is simple (u64 header size, a JSON table, raw data); reading it
directly avoids a runtime dependency on the `safetensors` package, whose
numpy backend cannot read bfloat16, the dtype of nearly every released MoE
checkpoint. Tensors are read one at a time, on demand.

The header is checked as the reference `safetensors` library checks it:
tensors tile the data section exactly (no overlap, no gap, nothing after
the last tensor), each tensor's byte count matches its dtype and shape. A
sharded checkpoint's `weight_map` is honoured: every tensor must sit in the
shard the index names, shard names must be plain file names inside the
model directory, and a tensor in two shards is refused. Any violation
raises `LoadError` naming the file and the tensor or field. The format has
no checksum: a bit flip inside tensor data is invisible here (`load_hf`
refuses the non-finite values such a flip may create).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import struct
from typing import Any

import ml_dtypes
import numpy as np

from wisp_jax.errors import LoadError, MissingFileError, read_json

DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"),
          "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The reference library's limit: a larger header is a corrupt size field.
MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`
  nbytes: int


def _unreadable(file: pathlib.Path, problem: str) -> LoadError:
  return LoadError(f"{file} is not a readable safetensors file ({problem}); "
                   "re-save it with save_pretrained.", file=file)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _entry(file: pathlib.Path, name: str, entry: Any
           ) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry, checked."""
  def bad(problem: str) -> LoadError:
    return LoadError(f"{file} is corrupt: tensor {name!r} {problem}.",
                     file=file, field=name)

  if not isinstance(entry, dict):
    raise bad(f"has header entry {entry!r}, not an object")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
  if missing:
    raise bad(f"lacks {missing} in its header entry")
  dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
  if not isinstance(dtype, str):
    raise bad(f"has dtype {dtype!r}, not a string")
  if dtype not in DTYPES:
    raise LoadError(f"tensor {name!r} in {file} has dtype {dtype}; wisp_jax "
                    f"reads {', '.join(DTYPES)} (no quantised checkpoints).",
                    file=file, field=name)
  if not isinstance(shape, list) or not all(
      _is_int(n) and n >= 0 for n in shape):
    raise bad(f"has shape {shape!r}, not a list of ints >= 0")
  if (not isinstance(offsets, list) or len(offsets) != 2
      or not all(_is_int(n) and n >= 0 for n in offsets)
      or offsets[0] > offsets[1]):
    raise bad(f"has data_offsets {offsets!r}, not [begin, end] with "
              "0 <= begin <= end")
  begin, end = offsets
  nbytes = math.prod(shape) * DTYPES[dtype].itemsize
  if end - begin != nbytes:
    raise bad(f"of dtype {dtype} and shape {tuple(shape)} needs {nbytes} "
              f"bytes but spans bytes {begin}..{end}")
  return dtype, tuple(shape), begin, end


def read_header(file: pathlib.Path) -> dict[str, TensorInfo]:
  """Tensor table of one safetensors file (u64 header size, JSON, data).

  Raises:
    MissingFileError: if `file` does not exist.
    LoadError: naming the file and tensor, if the header is not JSON, does
      not describe the data section exactly, or uses an unsupported dtype.
  """
  file = pathlib.Path(file)
  try:
    size = file.stat().st_size
    with open(file, "rb") as fh:
      prefix = fh.read(8)
      if len(prefix) < 8:
        raise _unreadable(file, f"{size} bytes, shorter than the 8-byte "
                          "header size")
      header_len = struct.unpack("<Q", prefix)[0]
      if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise _unreadable(file, f"header of {header_len} bytes in a file of "
                          f"{size}")
      raw = fh.read(header_len)
  except FileNotFoundError:
    raise MissingFileError(f"{file} does not exist.", file=file) from None
  except OSError as e:
    raise LoadError(f"{file} cannot be read ({e.strerror}).",
                    file=file) from None
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError included
    raise _unreadable(file, f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise _unreadable(file, "header is not a JSON object")
  metadata = header.pop("__metadata__", {})
  if not isinstance(metadata, dict) or not all(
      isinstance(v, str) for v in metadata.values()):
    raise LoadError(f"{file} is corrupt: __metadata__ {metadata!r} is not a "
                    "map of strings.", file=file, field="__metadata__")
  entries = {name: _entry(file, name, entry) for name, entry in header.items()}
  _check_tiling(file, entries, size - 8 - header_len)
  return {name: TensorInfo(file, dtype, shape, 8 + header_len + begin,
                           end - begin)
          for name, (dtype, shape, begin, end) in entries.items()}


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  keys = [key for key, _ in pairs]
  if len(set(keys)) != len(keys):
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"it names {repeated} twice")
  return dict(pairs)


def _check_tiling(file: pathlib.Path, entries: dict[str, tuple],
                  data_bytes: int) -> None:
  """Tensors must cover bytes [0, data_bytes) of the data section exactly
  once, in some order (the reference library's rule)."""
  spans = sorted((begin, end, name) for name, (_, _, begin, end)
                 in entries.items())
  position, previous = 0, None
  for begin, end, name in spans:
    if begin < position:
      raise LoadError(
          f"{file} is corrupt: tensor {name!r} (bytes {begin}..{end}) "
          f"overlaps tensor {previous!r}, which ends at byte {position}.",
          file=file, field=name)
    if begin > position:
      raise LoadError(
          f"{file} is corrupt: bytes {position}..{begin} of the data belong "
          f"to no tensor (the next one is {name!r}).", file=file, field=name)
    position, previous = end, name
  if position > data_bytes:
    raise LoadError(
        f"{file} is truncated: tensor {previous!r} ends at data byte "
        f"{position}, but the file holds {data_bytes} data bytes.",
        file=file, field=previous)
  if position < data_bytes:
    raise LoadError(
        f"{file} is corrupt: {data_bytes - position} bytes follow the last "
        "tensor's data.", file=file)


def _shard_path(directory: pathlib.Path, index: pathlib.Path, name: str,
                shard: Any) -> pathlib.Path:
  """The shard `shard` of tensor `name`, which must lie in `directory`."""
  if (not isinstance(shard, str) or not shard or shard in (".", "..")
      or pathlib.PurePath(shard).name != shard or "\\" in shard):
    raise LoadError(
        f"{index} maps tensor {name!r} to shard {shard!r}, which is not a "
        f"plain file name in {directory}; refusing to read outside the "
        "model directory.", file=index, field=name)
  return directory / shard


def _check_shard_series(index: pathlib.Path, shards: set[str]) -> None:
  """Shards named `<stem>-<k>-of-<n>.safetensors` (what save_pretrained
  writes) must all be in the weight_map: a missing one means the map lost
  entries (a damaged index), not that the model has fewer tensors."""
  for shard in sorted(shards):
    match = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.safetensors", shard)
    if not match:
      continue
    stem, width, total = match[1], len(match[2]), match[3]
    for k in range(1, int(total) + 1):
      sibling = f"{stem}-{k:0{width}d}-of-{total}.safetensors"
      if sibling not in shards:
        raise LoadError(
            f"{index} maps tensors to {shard} but none to {sibling}: its "
            "weight_map is incomplete (a damaged index?).", file=index,
            field="weight_map")


class SafetensorsCheckpoint:
  """Lazily reads the tensors of a (possibly sharded) safetensors checkpoint.

  Attributes:
    tensors: tensor name -> `TensorInfo` (its file, dtype, shape, bytes).
    source: the index file of a sharded checkpoint, else the single file;
      what error messages about the checkpoint as a whole name.
  """

  def __init__(self, directory: pathlib.Path):
    directory = pathlib.Path(directory)
    index = directory / INDEX_FILE
    single = directory / SINGLE_FILE
    if index.is_file():
      self.source = index
      self.tensors = self._read_sharded(directory, index)
    elif single.is_file():
      self.source = single
      self.tensors = read_header(single)
    else:
      raise MissingFileError(
          f"{directory} holds no {SINGLE_FILE} nor {INDEX_FILE}; save the "
          "model with save_pretrained(..., safe_serialization=True).",
          file=directory)
    self._last: tuple[str, np.ndarray] | None = None

  @staticmethod
  def _read_sharded(directory: pathlib.Path, index: pathlib.Path
                    ) -> dict[str, TensorInfo]:
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content,
                                                         dict) else None
    if not isinstance(weight_map, dict):
      raise LoadError(f"{index} has no 'weight_map' of tensor -> shard.",
                      file=index, field="weight_map")
    shard_of = {name: _shard_path(directory, index, name, shard)
                for name, shard in weight_map.items()}
    _check_shard_series(index, {file.name for file in shard_of.values()})
    tensors: dict[str, TensorInfo] = {}
    for file in sorted(set(shard_of.values())):
      if not file.is_file():
        raise MissingFileError(f"{index} lists shard {file.name}, which is "
                               f"missing from {directory}.", file=index,
                               field=file.name)
      for name, info in read_header(file).items():
        if name not in shard_of:
          raise LoadError(
              f"{index} does not list tensor {name!r}, which shard "
              f"{file.name} holds; the index and its shards disagree.",
              file=index, field=name)
        if shard_of[name] != file:
          raise LoadError(
              f"{index} maps tensor {name!r} to shard "
              f"{shard_of[name].name}, but shard {file.name} holds it too; "
              "refusing to choose between two copies.", file=index,
              field=name)
        tensors[name] = info
    absent = sorted(set(shard_of) - set(tensors))
    if absent:
      raise LoadError(
          f"{index} maps tensor {absent[0]!r} to shard "
          f"{shard_of[absent[0]].name}, which does not hold it "
          f"({len(absent)} such tensor(s)).", file=index, field=absent[0])
    return tensors

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` as numpy, in its stored dtype."""
    if self._last is not None and self._last[0] == name:
      return self._last[1]  # a fused gate_up tensor feeds two parameters.
    info = self.tensors[name]
    try:
      with open(info.file, "rb") as fh:
        fh.seek(info.offset)
        data = fh.read(info.nbytes)
    except OSError as e:
      raise LoadError(f"{info.file} cannot be read ({e.strerror}).",
                      file=info.file, field=name) from None
    if len(data) != info.nbytes:
      raise LoadError(f"{info.file} is truncated: tensor {name!r} has "
                      f"{len(data)} of its {info.nbytes} bytes.",
                      file=info.file, field=name)
    array = np.frombuffer(data, DTYPES[info.dtype]).reshape(info.shape)
    self._last = (name, array)
    return array
