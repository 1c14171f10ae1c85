"""Text in, text out: the tokenizer that belongs to a model.

Two tokenizers, one interface (`encode(text) -> [n] int32`,
`decode(ids) -> str`):

- `ByteTokenizer`: the byte-level default model family (vocab_size 256):
  UTF-8 bytes, as `wisp_jax.data.encode` / `decode`.
- `HFTokenizer`: a Hugging Face `tokenizer.json` (the `tokenizers` package,
  the `hf` extra), for models imported with `from_pretrained(directory)`
  when the directory holds one.

`from_pretrained` records what it learned about a model (its directory,
tokenizer, `eos_token_id`) in `model_info(model)`, which `generate` reads to
take and return text and to stop at the end-of-sequence token.
"""

from __future__ import annotations

import dataclasses
import pathlib
import weakref
from typing import Any, Sequence

import numpy as np

from wisp_jax import data
from wisp_jax.errors import LoadError

TOKENIZER_FILE = "tokenizer.json"
BYTE_VOCAB = 256


class ByteTokenizer:
  """UTF-8 bytes as token ids (the default model's vocabulary)."""

  vocab_size = BYTE_VOCAB

  def encode(self, text: str) -> np.ndarray:
    """`[n]` int32 byte ids of `text`."""
    return data.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of byte ids; invalid UTF-8 becomes U+FFFD."""
    return data.decode(ids)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, read with the `tokenizers` package.

  Attributes:
    path: the `tokenizer.json` file.
    vocab_size: ids the tokenizer can produce (added tokens included).
  """

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          f"{self.path} needs the `tokenizers` package: pip install "
          "'wisp_jax[hf]' (or pip install tokenizers).") from e
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
    except Exception as e:  # the Rust side raises plain Exceptions
      raise LoadError(f"{self.path} is not a readable tokenizer.json "
                      f"({e}).", file=self.path) from None
    self.vocab_size = int(
        self._tokenizer.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    """`[n]` int32 token ids of `text` (no special tokens added)."""
    ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens skipped."""
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                  skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What `from_pretrained` knows about a model beyond its weights.

  Attributes:
    path: the directory it was loaded from ("default": the shipped model).
    kind: "default", "checkpoint" (a wisp_jax checkpoint) or "huggingface".
    tokenizer: its tokenizer, or None.
    eos_token_id: end-of-sequence ids from the Hugging Face `config.json`
      (or `generation_config.json`), empty if it names none.
  """
  path: str
  kind: str
  tokenizer: Any = None
  eos_token_id: tuple[int, ...] = ()


_INFO: "weakref.WeakKeyDictionary[Any, ModelInfo]" = (
    weakref.WeakKeyDictionary())


def set_model_info(model: Any, info: ModelInfo) -> None:
  """Records `info` for `model` (kept as long as the model lives)."""
  _INFO[model] = info


def model_info(model: Any) -> ModelInfo | None:
  """What `from_pretrained` recorded for `model`, or None."""
  return _INFO.get(model)


def tokenizer_for(model: Any) -> ByteTokenizer | HFTokenizer | None:
  """The model's tokenizer: its recorded one, bytes for a vocabulary of
  256 (the byte-level family), else None."""
  info = model_info(model)
  if info is not None and info.tokenizer is not None:
    return info.tokenizer
  if model.config.vocab_size == BYTE_VOCAB:
    return ByteTokenizer()
  return None


def eos_ids(hf_config: dict) -> tuple[int, ...]:
  """`eos_token_id` of a Hugging Face config dict: an int, a list or absent."""
  value = hf_config.get("eos_token_id")
  if value is None:
    return ()
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
             for v in values):
    raise LoadError(f"config.json eos_token_id={value!r} is not a token id "
                    "or a list of them.", field="eos_token_id")
  return tuple(values)


def load_tokenizer(directory: str | pathlib.Path) -> HFTokenizer | None:
  """The `tokenizer.json` of a Hugging Face directory, or None if absent."""
  path = pathlib.Path(directory) / TOKENIZER_FILE
  return HFTokenizer(path) if path.is_file() else None
