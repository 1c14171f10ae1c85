"""The loaders' own errors, and a JSON reader that raises them.

Every loader (safetensors, Hugging Face config and index, orbax
checkpoints, routing traces and logs) refuses a missing, malformed, corrupt
or inconsistent file with a `LoadError` whose message names the file and,
where it can, the field, tensor or line. `LoadError` is a `ValueError`, so
callers that caught `ValueError` keep working.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


class LoadError(ValueError):
  """A file cannot be loaded: missing, malformed, corrupt or inconsistent.

  Attributes:
    file: the offending file or directory (as text), or None.
    field: the field, tensor or line that is wrong, or None.
  """

  def __init__(self, message: str, *, file: str | os.PathLike | None = None,
               field: str | None = None):
    file_text = None if file is None else str(file)
    if file_text is not None and file_text not in message:
      message = f"{file_text}: {message}"
    super().__init__(message)
    self.file, self.field = file_text, field


class MissingFileError(LoadError, FileNotFoundError):
  """A file a loader needs does not exist."""


class _DuplicateKey(ValueError):
  pass


def _refuse_conflicting_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """`object_pairs_hook`: a key given twice with two values is ambiguous."""
  out: dict[str, Any] = {}
  for key, value in pairs:
    if key in out and out[key] != value:
      raise _DuplicateKey(f"key {key!r} is given twice, as {out[key]!r} and "
                          f"{value!r}")
    out[key] = value
  return out


def read_json(file: str | os.PathLike, error: type[LoadError] = LoadError
              ) -> Any:
  """Parses the JSON file `file`, refusing what `json.loads` lets through.

  Args:
    file: the file to read.
    error: the `LoadError` subclass to raise.

  Returns:
    the parsed value.

  Raises:
    MissingFileError: if `file` does not exist.
    LoadError (`error`): if it cannot be read, is not UTF-8, is not JSON, or
      gives one key two different values.
  """
  file = pathlib.Path(file)
  try:
    data = file.read_bytes()
  except FileNotFoundError:
    raise MissingFileError(f"{file} does not exist.", file=file) from None
  except OSError as e:
    raise error(f"{file} cannot be read ({e.strerror}).", file=file) from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(f"{file} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                f"offset {e.start}); the file is corrupt.", file=file) from None
  try:
    return json.loads(text, object_pairs_hook=_refuse_conflicting_keys)
  except json.JSONDecodeError as e:
    raise error(f"{file} is not valid JSON ({e.msg}: line {e.lineno} "
                f"column {e.colno}); the file is truncated or corrupt.",
                file=file, field=f"line {e.lineno}") from None
  except _DuplicateKey as e:
    raise error(f"{file} is ambiguous: {e}.", file=file) from None
  except RecursionError:
    raise error(f"{file} nests JSON too deeply to be a config.",
                file=file) from None
