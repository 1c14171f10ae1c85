"""A small reader of (possibly sharded) safetensors checkpoints.

The format is simple (u64 header size, a JSON table, raw data); reading it
directly avoids a runtime dependency on the `safetensors` package, whose
numpy backend cannot read bfloat16, the dtype of nearly every released MoE
checkpoint. Tensors are read one at a time, on demand.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"),
           "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the data in `file`
  nbytes: int


def read_header(file: pathlib.Path) -> dict[str, TensorInfo]:
  """Tensor table of one safetensors file (u64 header size, JSON, data)."""
  size = file.stat().st_size
  with open(file, "rb") as fh:
    prefix = fh.read(8)
    header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
    try:
      if header_len > size - 8:
        raise ValueError("header longer than the file")
      header = json.loads(fh.read(header_len))
    except ValueError as e:
      raise ValueError(f"{file} is not a readable safetensors file ({e}); "
                       "re-save it with save_pretrained.") from None
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"tensor {name!r} in {file} has dtype "
                       f"{entry['dtype']}; wisp_jax reads "
                       f"{', '.join(DTYPES)} (no quantised checkpoints).")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if (end - begin != math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        or 8 + header_len + end > size):
      raise ValueError(f"{file} is corrupt or truncated: tensor {name!r} of "
                       f"shape {shape} spans bytes {begin}..{end}.")
    tensors[name] = TensorInfo(file, entry["dtype"], shape,
                                8 + header_len + begin, end - begin)
  return tensors


class SafetensorsCheckpoint:
  """Lazily reads the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, directory: pathlib.Path):
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' of tensor -> shard.")
      files = sorted({directory / f for f in weight_map.values()})
      for file in files:
        if not file.is_file():
          raise FileNotFoundError(f"{index} lists shard {file.name}, which is "
                                  f"missing from {directory}.")
    elif single.is_file():
      files = [single]
    else:
      raise FileNotFoundError(
          f"{directory} holds no model.safetensors nor "
          "model.safetensors.index.json; save the model with "
          "save_pretrained(..., safe_serialization=True).")
    self.tensors: dict[str, TensorInfo] = {}
    for file in files:
      self.tensors.update(read_header(file))
    self._last: tuple[str, np.ndarray] | None = None

  def read(self, name: str) -> np.ndarray:
    """Tensor `name` as numpy, in its stored dtype."""
    if self._last is not None and self._last[0] == name:
      return self._last[1]  # a fused gate_up tensor feeds two parameters.
    info = self.tensors[name]
    with open(info.file, "rb") as fh:
      fh.seek(info.offset)
      data = fh.read(info.nbytes)
    array = np.frombuffer(data, DTYPES[info.dtype]).reshape(info.shape)
    self._last = (name, array)
    return array
