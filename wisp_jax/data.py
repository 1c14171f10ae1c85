"""Byte-level text corpus: the Python standard library's own source files.

Every machine that runs Python has this corpus, so training and the demos
need no download. Files are read in sorted order of their path relative to
the stdlib root, and each file goes to the training or the validation split
by a hash of that relative path alone, so the split of a given file never
depends on which other files exist (Python versions differ a little).

Shape legend as in `wisp_jax.models.moe`: B batch, T time.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import zlib
from typing import Iterator

import numpy as np

# Directories of the stdlib tree that are not the standard library's own
# modules (third-party packages) or are mostly test data.
_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests",
    "idlelib", "lib2to3", "turtledemo", "ensurepip", "tkinter",
})

# Files are split into buckets by crc32 of their relative path.
_SPLIT_BUCKETS = 1000


def stdlib_root() -> pathlib.Path:
  """Directory of the running interpreter's standard library."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
  """Relative paths (posix) of the stdlib's `.py` files, sorted.

  Args:
    root: the stdlib directory; the running interpreter's if None.

  Returns:
    sorted relative paths, third-party and test directories excluded.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  if not root.is_dir():
    raise FileNotFoundError(f"stdlib directory {root} does not exist.")
  paths = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if _SKIP_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
      paths.append(rel.as_posix())
  if not paths:
    raise FileNotFoundError(f"no .py files found under {root}.")
  return sorted(paths)


def is_validation_file(rel_path: str, val_fraction: float) -> bool:
  """Whether `rel_path` belongs to the validation split (hash of the path)."""
  bucket = zlib.crc32(rel_path.encode("utf-8")) % _SPLIT_BUCKETS
  return bucket < round(val_fraction * _SPLIT_BUCKETS)


def split_files(files: list[str], val_fraction: float
                ) -> tuple[list[str], list[str]]:
  """Splits relative paths into (train, validation), each kept sorted."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  train = [f for f in files if not is_validation_file(f, val_fraction)]
  val = [f for f in files if is_validation_file(f, val_fraction)]
  return train, val


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The two splits of the byte corpus.

  Attributes:
    train: `[n_train]` uint8 bytes of the training files, concatenated.
    validation: `[n_val]` uint8 bytes of the held-out files, concatenated.
    train_files: relative paths of the training files, in order.
    validation_files: relative paths of the held-out files, in order.
  """
  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]


def _read(root: pathlib.Path, files: list[str], max_bytes: int | None
          ) -> tuple[np.ndarray, list[str]]:
  chunks, used, total = [], [], 0
  for rel in files:
    if max_bytes is not None and total >= max_bytes:
      break
    data = (root / rel).read_bytes()
    chunks.append(data)
    used.append(rel)
    total += len(data)
  joined = b"".join(chunks)
  if max_bytes is not None:
    joined = joined[:max_bytes]
  return np.frombuffer(joined, dtype=np.uint8).copy(), used


def load_corpus(val_fraction: float = 0.1, max_train_bytes: int | None = None,
                max_val_bytes: int | None = None,
                root: pathlib.Path | None = None) -> Corpus:
  """Reads the stdlib corpus and splits it by file.

  Args:
    val_fraction: share of files held out for validation.
    max_train_bytes: cap on the training bytes (first files in order).
    max_val_bytes: cap on the validation bytes.
    root: the stdlib directory; the running interpreter's if None.

  Returns:
    the `Corpus`.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  train_files, val_files = split_files(stdlib_files(root), val_fraction)
  if not train_files or not val_files:
    raise ValueError(f"val_fraction={val_fraction} leaves an empty split "
                     f"({len(train_files)} train, {len(val_files)} val files).")
  train, train_used = _read(root, train_files, max_train_bytes)
  val, val_used = _read(root, val_files, max_val_bytes)
  return Corpus(train=train, validation=val, train_files=tuple(train_used),
                validation_files=tuple(val_used))


def batch_iterator(data: np.ndarray, batch_size: int, seq_len: int,
                   seed: int) -> Iterator[np.ndarray]:
  """Endless seeded stream of random windows of `data`.

  Args:
    data: `[n]` uint8 bytes.
    batch_size: B.
    seq_len: T; each window has T + 1 bytes (inputs and shifted targets).
    seed: same seed, same stream.

  Yields:
    `[B, T + 1]` int32 windows.
  """
  if data.size < seq_len + 1:
    raise ValueError(f"corpus of {data.size} bytes is shorter than one "
                     f"window of seq_len + 1 = {seq_len + 1} bytes.")
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, data.size - seq_len, size=batch_size)
    yield data[starts[:, None] + offsets].astype(np.int32)


def eval_windows(data: np.ndarray, seq_len: int,
                 max_windows: int | None = None) -> np.ndarray:
  """Consecutive non-overlapping windows for evaluation.

  Args:
    data: `[n]` uint8 bytes.
    seq_len: T; windows are T + 1 bytes and overlap by one byte, so every
      byte after the first is predicted exactly once.
    max_windows: keep at most this many, evenly spaced over `data`.

  Returns:
    `[W, T + 1]` int32 windows.
  """
  count = (data.size - 1) // seq_len
  if count < 1:
    raise ValueError(f"{data.size} bytes make no window of {seq_len + 1}.")
  index = np.arange(count)
  if max_windows is not None and count > max_windows:
    index = np.linspace(0, count - 1, max_windows).round().astype(np.int64)
  starts = index * seq_len
  return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def sample_prompts(num_prompts: int = 4, max_bytes: int = 160,
                   val_fraction: float = 0.1,
                   root: pathlib.Path | None = None) -> list[str]:
  """Real-text prompts: the opening of a function in held-out stdlib files.

  Deterministic: the first `def` line of each held-out file (in sorted
  order) that has one, cut at the last line end within `max_bytes`; files
  where that leaves under `max_bytes // 2` bytes are skipped.

  Args:
    num_prompts: how many prompts.
    max_bytes: longest prompt in bytes.
    val_fraction: the split whose held-out files are used.
    root: the stdlib directory; the running interpreter's if None.

  Returns:
    `num_prompts` strings, each at most `max_bytes` UTF-8 bytes.
  """
  root = pathlib.Path(root) if root is not None else stdlib_root()
  _, val_files = split_files(stdlib_files(root), val_fraction)
  prompts = []
  for rel in val_files:
    text = (root / rel).read_bytes()
    at = text.find(b"\ndef ")
    if at < 0:
      continue
    chunk = text[at + 1:at + 1 + max_bytes]
    cut = chunk.rfind(b"\n")
    if cut < max_bytes // 2:  # too short to show off a continuation
      continue
    try:
      prompts.append(chunk[:cut + 1].decode("utf-8"))
    except UnicodeDecodeError:
      continue
    if len(prompts) == num_prompts:
      return prompts
  raise ValueError(f"found only {len(prompts)} of {num_prompts} prompts in "
                   f"the held-out files under {root}.")


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as `[n]` int32 token ids.

  The tokenizer of the byte-level default model (vocab_size 256):
  `generate(model, data.encode(text), n)` equals `generate(model, text, n)`.
  """
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
  """Text of byte token ids (the default model's output); invalid UTF-8
  becomes U+FFFD."""
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode(
      "utf-8", errors="replace")
