"""Native orbax checkpoints of a `MoEModel`.

Layout of a checkpoint directory:

```
path/
  config.json   {"format": "wisp_jax.moe_checkpoint", "version": 2,
                 "dtype": "float32", "config": {MoEConfig fields}}
  decoder/      orbax item: flat {"layers.attn.q_proj": [L, D, H*Dh], ...}
                (the decoder layers' parameters stacked [L, ...])
  experts/      orbax item: {"gate": [L, E, D, F], "up": [L, E, D, F],
                             "down": [L, E, F, D]}
```

Version 1 checkpoints (one entry per layer, `"layers.0.attn.q_proj":
[D, H*Dh]`, written before the layers were stacked; the shipped default
model is one) are read too: their per-layer tensors are stacked on restore.

The experts are a separate item so a pager can restore them alone, straight
into host memory: orbax reads into the memory kind of the target
`ShapeDtypeStruct`'s sharding, so with `pinned_host` the expert bytes never
pass through device memory. A dtype other than the stored one is converted
while reading.

Reading refuses, with a `CheckpointError` naming the checkpoint and the
item, field or tensor, anything orbax cannot read (a truncated or corrupt
`_METADATA`, manifest or chunk), a `config.json` whose fields have the
wrong type, and weights that are NaN or infinite (what a bit flip in a
chunk usually leaves). A flip that leaves finite values is invisible: the
format stores no checksum of the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from wisp_jax.errors import LoadError, read_json
from wisp_jax.models import moe
from wisp_jax.models.config import MoEConfig
from wisp_jax.models.transformer import MoEModel

FORMAT = "wisp_jax.moe_checkpoint"
VERSION = 2
# Versions `restore` reads: 1 stores each layer apart, 2 stacks them.
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "config.json"
DECODER_ITEM = "decoder"
EXPERTS_ITEM = "experts"
EXPERT_NAMES = ("gate", "up", "down")


class CheckpointError(LoadError):
  """A checkpoint is missing, malformed or does not match what was asked."""


def _first_line(error: Exception, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  return f"{type(error).__name__}: {text[:limit]}"


def _orbax(path: pathlib.Path, item: str, action: str, read):
  """Runs the orbax call `read`; any failure is the checkpoint's fault."""
  try:
    with _quiet():
      return read()
  except CheckpointError:
    raise
  except Exception as e:  # orbax and tensorstore raise many types.
    raise CheckpointError(
        f"checkpoint {path}: cannot {action} item {item!r} "
        f"({path / item}): {_first_line(e)}. The checkpoint is corrupt or "
        "incomplete; save it again or restore a copy.",
        file=path / item) from e


@contextlib.contextmanager
def _quiet():
  """Silences orbax's per-call INFO lines (it logs through absl)."""
  verbosity = logging.get_verbosity()
  # absl verbosity grows with detail: INFO=0 > WARNING=-1.
  logging.set_verbosity(min(verbosity, logging.WARNING))
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _checkpointer() -> ocp.Checkpointer:
  # Synchronous: `save` returns once the files are committed.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _flat_name(path: tuple[Any, ...]) -> str:
  return ".".join(str(part) for part in path)


def _decoder_flat(decoder) -> dict[str, Any]:
  """The decoder's params as a flat `{dotted name: array}` dict."""
  return {_flat_name(path): variable[...]
          for path, variable in nnx.to_flat_state(nnx.state(decoder))}


def save(model: MoEModel, path: str | os.PathLike, dtype=None) -> pathlib.Path:
  """Writes `model` to the directory `path` (overwrites a wisp checkpoint).

  Args:
    model: the model to save.
    path: checkpoint directory; created, or replaced if it already holds a
      wisp_jax checkpoint.
    dtype: store the weights in this dtype (e.g. `jnp.bfloat16` to halve
      the size); the model's own dtype if None.

  Returns:
    the absolute checkpoint path.
  """
  path = pathlib.Path(path).absolute()
  is_checkpoint = (path / CONFIG_FILE).exists()
  if path.exists() and any(path.iterdir()) and not is_checkpoint:
    raise CheckpointError(
        f"{path} exists, is not empty and is not a wisp_jax checkpoint; "
        "refusing to overwrite it. Choose an empty or new directory.")
  dtype = jnp.dtype(dtype or model.dtype)

  def cast(x: jax.Array) -> jax.Array:
    if x.dtype == dtype:
      return x
    # Through NumPy: a host-memory (pinned_host) array cannot run astype.
    return jnp.asarray(np.asarray(x).astype(dtype))

  decoder = {k: cast(v) for k, v in _decoder_flat(model.decoder).items()}
  experts = {name: cast(getattr(model.experts, name)[...])
             for name in EXPERT_NAMES}
  if is_checkpoint:  # until rewritten, the directory is no checkpoint
    (path / CONFIG_FILE).unlink()
  path.mkdir(parents=True, exist_ok=True)
  with _quiet():
    checkpointer = _checkpointer()
    checkpointer.save(path / DECODER_ITEM,
                      args=ocp.args.StandardSave(decoder), force=True)
    checkpointer.save(path / EXPERTS_ITEM,
                      args=ocp.args.StandardSave(experts), force=True)
  # Written last: a directory with config.json is a complete checkpoint.
  meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name,
          "config": dataclasses.asdict(model.config)}
  (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  return path


def _read_meta(path: pathlib.Path) -> dict[str, Any]:
  if not path.exists():
    raise CheckpointError(f"checkpoint directory {path} does not exist.")
  if not path.is_dir():
    raise CheckpointError(f"checkpoint path {path} is not a directory.")
  config_file = path / CONFIG_FILE
  if not config_file.exists():
    raise CheckpointError(
        f"{path} is not a wisp_jax checkpoint: it has no {CONFIG_FILE}. "
        "Write one with wisp_jax.models.checkpoint.save.")
  meta = read_json(config_file, CheckpointError)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(
        f"{path} is not a wisp_jax checkpoint: {CONFIG_FILE} has format "
        f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
        f"expected {FORMAT!r}.")
  if meta.get("version") not in READABLE_VERSIONS:
    raise CheckpointError(f"{path} has checkpoint version "
                          f"{meta.get('version')!r}; this code reads "
                          f"versions {list(READABLE_VERSIONS)}.")
  try:
    known = isinstance(meta.get("dtype"), str) and jnp.issubdtype(
        jnp.dtype(meta["dtype"]), jnp.floating)
  except TypeError:  # not a dtype name
    known = False
  if not known:
    raise CheckpointError(
        f"{config_file} has dtype {meta.get('dtype')!r}, not the name of a "
        "float dtype; the file is corrupt.", file=config_file, field="dtype")
  if not isinstance(meta.get("config"), dict):
    raise CheckpointError(
        f"{config_file} has config {meta.get('config')!r:.80}, not an object "
        "of MoEConfig fields; the file is corrupt.", file=config_file,
        field="config")
  for item in (DECODER_ITEM, EXPERTS_ITEM):
    if not (path / item).is_dir():
      raise CheckpointError(f"checkpoint {path} lacks its {item!r} item "
                            f"({path / item}); it is incomplete.")
  return meta


def is_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` holds a wisp_jax checkpoint (not, e.g., a HF model)."""
  config_file = pathlib.Path(path) / CONFIG_FILE
  try:
    meta = json.loads(config_file.read_bytes().decode("utf-8"))
  except (OSError, ValueError, RecursionError):  # bad UTF-8 is a ValueError
    return False
  return isinstance(meta, dict) and meta.get("format") == FORMAT


def load_config(path: str | os.PathLike) -> MoEConfig:
  """The `MoEConfig` stored in the checkpoint at `path`."""
  path = pathlib.Path(path).absolute()
  fields = _read_meta(path)["config"]
  config_file = path / CONFIG_FILE
  known = {f.name: f for f in dataclasses.fields(MoEConfig)}
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise CheckpointError(f"checkpoint {path} has config fields {unknown} "
                          "that this MoEConfig does not know.",
                          file=config_file, field=unknown[0])
  hints = typing.get_type_hints(MoEConfig)
  for name, value in fields.items():
    if not _has_type(value, hints[name]):
      raise CheckpointError(
          f"{config_file}: config field {name}={value!r} is not of type "
          f"{getattr(hints[name], '__name__', hints[name])}; the file is "
          "corrupt.", file=config_file, field=name)
  missing = sorted(name for name, f in known.items() if name not in fields
                   and f.default is dataclasses.MISSING)
  if missing:
    raise CheckpointError(f"{config_file} lacks config fields {missing}; "
                          "the file is corrupt.", file=config_file,
                          field=missing[0])
  try:
    return MoEConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"{config_file}: {e}", file=config_file) from None


def _has_type(value: Any, hint: Any) -> bool:
  """Whether a JSON value fits a MoEConfig field's type (no bool as int)."""
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not (isinstance(value, float) and not math.isfinite(value)))
  return isinstance(value, str)  # str and the Literal of qk_norm


def _check_config(path: pathlib.Path, stored: MoEConfig,
                  expected: MoEConfig | None) -> None:
  if expected is None or expected == stored:
    return
  diff = {f.name: (getattr(stored, f.name), getattr(expected, f.name))
          for f in dataclasses.fields(MoEConfig)
          if getattr(stored, f.name) != getattr(expected, f.name)}
  details = ", ".join(f"{k}: checkpoint {a!r} vs expected {b!r}"
                      for k, (a, b) in diff.items())
  raise CheckpointError(f"config mismatch for checkpoint {path}: {details}.")


def _targets(path: pathlib.Path, item: str,
             expected: dict[str, jax.ShapeDtypeStruct], dtype,
             sharding: jax.sharding.Sharding
             ) -> dict[str, jax.ShapeDtypeStruct]:
  """Checks the stored tensors against `expected`; returns restore targets."""
  stored = _orbax(path, item, "read the metadata of",
                  lambda: _checkpointer().metadata(path / item).item_metadata)
  if stored is None or not hasattr(stored, "items"):
    meta_file = path / item / "_METADATA"
    problem = (f"{meta_file} is missing" if not meta_file.exists() else
               f"its _METADATA, _sharding or manifest in {path / item} is "
               "corrupt")
    raise CheckpointError(
        f"checkpoint {path} item {item!r} has no readable tensor metadata "
        f"({problem}); save the checkpoint again.",
        file=meta_file if not meta_file.exists() else path / item)
  stored = {k: v for k, v in stored.items()}
  for name, value in stored.items():
    if not isinstance(getattr(value, "shape", None), (tuple, list)):
      raise CheckpointError(
          f"checkpoint {path} tensor {item}/{name} has metadata {value!r:.80} "
          f"without a shape ({path / item / '_METADATA'} is corrupt).",
          file=path / item / "_METADATA", field=f"{item}/{name}")
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing or extra:
    raise CheckpointError(
        f"checkpoint {path} item {item!r} does not match its config: "
        f"missing tensors {missing}, unexpected tensors {extra}.")
  for name, want in expected.items():
    if tuple(stored[name].shape) != tuple(want.shape):
      raise CheckpointError(
          f"checkpoint {path} tensor {item}/{name} has shape "
          f"{tuple(stored[name].shape)}, but its config gives "
          f"{tuple(want.shape)}.")
  return {name: jax.ShapeDtypeStruct(
      want.shape, dtype or stored[name].dtype, sharding=sharding)
          for name, want in expected.items()}


def _sharding(memory_kind: str | None) -> jax.sharding.Sharding:
  device = jax.devices()[0]
  if memory_kind is None:
    return jax.sharding.SingleDeviceSharding(device)
  kinds = [m.kind for m in device.addressable_memories()]
  if memory_kind not in kinds:
    raise CheckpointError(f"memory kind {memory_kind!r} is not available on "
                          f"{device}; it offers {kinds}.")
  return jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)


@jax.jit
def _host_block_finite(array: jax.Array, layer: jax.Array,
                       row: jax.Array) -> jax.Array:
  """Whether block `[layer, row]` of a host-memory `[A, B, ...]` array is
  finite: sliced on the host, moved, reduced on the device (the paging
  path that works on GPU; XLA cannot compute on host memory)."""
  sizes = (1, 1) + array.shape[2:]
  start = (layer, row) + (0,) * (array.ndim - 2)
  block = jax.lax.dynamic_slice(array, start, sizes)
  return jnp.all(jnp.isfinite(jax.device_put(block,
                                             jax.memory.Space.Device)))


def _all_finite(array: jax.Array) -> bool:
  if array.sharding.memory_kind in (None, "device"):
    return bool(jax.device_get(jnp.all(jnp.isfinite(array))))
  if array.ndim < 2:  # small: read it on the host
    return bool(np.isfinite(jax.device_get(array)).all())
  # One [layer, expert] block at a time: no device copy of a whole bank.
  # Explicit index transfers keep this legal under transfer_guard.
  return all(bool(jax.device_get(_host_block_finite(
      array, jax.device_put(np.int32(a)), jax.device_put(np.int32(b)))))
             for a in range(array.shape[0]) for b in range(array.shape[1]))


def _check_finite(path: pathlib.Path, item: str,
                  arrays: dict[str, jax.Array]) -> None:
  """Refuses NaN or infinite weights, naming the tensor: a bit flip in a
  chunk usually leaves some."""
  for name, array in arrays.items():
    if not _all_finite(array):
      raise CheckpointError(
          f"checkpoint {path} tensor {item}/{name} holds NaN or infinite "
          f"values; the data in {path / item} is corrupt. Save the model "
          "again or restore a copy.", file=path / item,
          field=f"{item}/{name}")


def _check_dtype(dtype) -> None:
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise CheckpointError(
        f"restore dtype must be a float type, got {jnp.dtype(dtype).name}: "
        "orbax converts values, not bits. For a bf16 bank kept as uint16 "
        "bits, restore as bfloat16 and bitcast with "
        "jax.lax.bitcast_convert_type.")


def _expert_shapes(config: MoEConfig) -> dict[str, jax.ShapeDtypeStruct]:
  c = config
  shape_in = (c.num_layers, c.num_experts, c.d_model, c.expert_ffn)
  shape_out = (c.num_layers, c.num_experts, c.expert_ffn, c.d_model)
  return {"gate": jax.ShapeDtypeStruct(shape_in, jnp.float32),
          "up": jax.ShapeDtypeStruct(shape_in, jnp.float32),
          "down": jax.ShapeDtypeStruct(shape_out, jnp.float32)}


def restore_experts(path: str | os.PathLike, memory_kind: str | None =
                    "pinned_host", dtype=None, *,
                    config: MoEConfig | None = None) -> moe.ExpertWeights:
  """Restores only the routed experts, into the given memory kind.

  Args:
    path: checkpoint directory.
    memory_kind: where the arrays land ("pinned_host", "unpinned_host",
      "device", or None for the default device memory). Orbax reads
      straight into that memory; nothing is staged on the device.
    dtype: convert to this dtype while reading; stored dtype if None.
    config: if given, raise unless the checkpoint's config equals it.

  Returns:
    `ExpertWeights` with gate/up `[L, E, D, F]` and down `[L, E, F, D]`.
  """
  path = pathlib.Path(path).absolute()
  _check_dtype(dtype)
  stored_config = load_config(path)
  _check_config(path, stored_config, config)
  targets = _targets(path, EXPERTS_ITEM, _expert_shapes(stored_config), dtype,
                     _sharding(memory_kind))
  arrays = _orbax(path, EXPERTS_ITEM, "restore", lambda: _checkpointer(
      ).restore(path / EXPERTS_ITEM, args=ocp.args.StandardRestore(targets)))
  _check_finite(path, EXPERTS_ITEM, {n: arrays[n] for n in EXPERT_NAMES})
  return moe.ExpertWeights(**{name: arrays[name] for name in EXPERT_NAMES})


def restore(path: str | os.PathLike, dtype=None,
            expert_memory_kind: str | None = None, *,
            config: MoEConfig | None = None) -> MoEModel:
  """Restores a `MoEModel` saved by `save`.

  Args:
    path: checkpoint directory.
    dtype: convert every weight to this dtype while reading (e.g. a float32
      checkpoint restored as bfloat16); the stored dtype if None.
    expert_memory_kind: memory kind of the expert arrays (e.g.
      "pinned_host" for a pager's host bank); default device memory if None.
    config: if given, raise unless the checkpoint's config equals it.

  Returns:
    the model; its experts live in `expert_memory_kind`.
  """
  path = pathlib.Path(path).absolute()
  _check_dtype(dtype)
  meta = _read_meta(path)
  stored_config = load_config(path)
  _check_config(path, stored_config, config)
  dtype = jnp.dtype(dtype or meta["dtype"])

  abstract = nnx.eval_shape(
      lambda: MoEModel(stored_config, rngs=nnx.Rngs(0), dtype=dtype))
  graphdef, abstract_state = nnx.split(abstract)
  flat = nnx.to_flat_state(abstract_state)
  expected = {_flat_name(p[1:]): v.get_value() for p, v in flat
              if p[0] == "decoder"}
  if meta["version"] == 1:
    decoder = _restore_per_layer(path, expected, dtype,
                                 stored_config.num_layers)
  else:
    targets = _targets(path, DECODER_ITEM, expected, dtype, _sharding(None))
    decoder = _orbax(path, DECODER_ITEM, "restore", lambda: _checkpointer(
        ).restore(path / DECODER_ITEM, args=ocp.args.StandardRestore(targets)))
  _check_finite(path, DECODER_ITEM, {name: decoder[name] for name in expected})
  experts = restore_experts(path, expert_memory_kind, dtype)

  values = []
  for p, variable in flat:
    if p[0] == "decoder":
      value = decoder[_flat_name(p[1:])]
    else:  # ("experts", name)
      value = getattr(experts, p[1])
    values.append((p, variable.replace(value)))
  state = nnx.from_flat_state(values)
  return nnx.merge(graphdef, state)


_LAYERS = "layers."


def _restore_per_layer(path: pathlib.Path,
                       expected: dict[str, jax.ShapeDtypeStruct], dtype,
                       num_layers: int) -> dict[str, jax.Array]:
  """Reads a version-1 decoder (`layers.<l>.<name>` per layer) and stacks
  each layer parameter into the `[L, ...]` `layers.<name>` of version 2."""
  per_layer = {}
  for name, want in expected.items():
    if name.startswith(_LAYERS):
      rest = name[len(_LAYERS):]
      for layer in range(num_layers):
        per_layer[f"{_LAYERS}{layer}.{rest}"] = jax.ShapeDtypeStruct(
            want.shape[1:], want.dtype)
    else:
      per_layer[name] = want
  targets = _targets(path, DECODER_ITEM, per_layer, dtype, _sharding(None))
  stored = _orbax(path, DECODER_ITEM, "restore", lambda: _checkpointer(
      ).restore(path / DECODER_ITEM, args=ocp.args.StandardRestore(targets)))
  decoder = {}
  for name in expected:
    if name.startswith(_LAYERS):
      rest = name[len(_LAYERS):]
      decoder[name] = jnp.stack([stored[f"{_LAYERS}{layer}.{rest}"]
                                 for layer in range(num_layers)])
    else:
      decoder[name] = stored[name]
  return decoder


def num_bytes(path: str | os.PathLike) -> int:
  """Total size in bytes of the files of a checkpoint directory."""
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*")
             if f.is_file())

