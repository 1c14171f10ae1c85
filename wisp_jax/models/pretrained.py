"""`from_pretrained`: a model from a local directory or the shipped default."""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp

from wisp_jax.errors import MissingFileError
from wisp_jax.models import tokenizer as tokenizer_lib
from wisp_jax.models.default import load_default
from wisp_jax.models.transformer import MoEModel

# What `experiments/train.py` writes next to its checkpoint.
_WORKDIR_FILES = ("summary.json", "metrics.jsonl")


def _refuse_non_model(directory: pathlib.Path, path) -> None:
  """Clear errors for the directories people pass by mistake."""
  from wisp_jax.models import checkpoint  # Heavy, load lazily.
  if directory.is_file():
    raise FileNotFoundError(
        f"{str(path)!r} is a file, not a model directory; pass the directory "
        f"that holds it ({str(directory.parent)!r}) or 'default'.")
  if not directory.is_dir():
    raise MissingFileError(
        f"model directory {str(path)!r} does not exist; pass a Hugging Face "
        "directory (config.json + safetensors), a wisp_jax checkpoint or "
        "'default'.", file=directory)
  inner = [p for p in sorted(directory.iterdir())
           if p.is_dir() and checkpoint.is_checkpoint(p)]
  if inner and not (directory / "model.safetensors").exists():
    named = [p for p in inner if p.name == "checkpoint"]
    found = str((named or inner)[-1])
    kind = ("a training workdir (experiments/train.py output)"
            if any((directory / f).exists() for f in _WORKDIR_FILES)
            else "a directory that holds wisp_jax checkpoints")
    raise MissingFileError(
        f"{str(path)!r} is {kind}, not a model; its checkpoint is "
        f"{found!r}: pass from_pretrained({found!r}).",
        file=directory)


def from_pretrained(path, dtype=jnp.float32,
                    expert_memory_kind: str | None = None) -> MoEModel:
  """Loads a model from a local directory.

  Args:
    path: a Hugging Face directory (`config.json` + safetensors, and
      `tokenizer.json` for text in and out) of a Mixtral, Qwen2-MoE,
      Qwen3-MoE or OLMoE model, a wisp_jax orbax checkpoint (the
      `checkpoint/` folder of an `experiments/train.py` workdir), or
      "default" for the shipped byte-level default model.
    dtype: parameter dtype.
    expert_memory_kind: native checkpoints only: restore the experts into
      this memory kind (e.g. "pinned_host") without passing through device
      memory.

  Returns:
    the `MoEModel`. `wisp_jax.models.tokenizer.model_info(model)` holds its
    tokenizer and `eos_token_id` (read from `config.json`), which
    `generate` uses for text prompts and `stop_at_eos=True`.

  Raises:
    FileNotFoundError: `path` is missing or is a file; or it is a training
      workdir (the message names the checkpoint inside it).
    LoadError: the directory's files are malformed (see `hf_import`).
  """
  from wisp_jax.models import checkpoint, hf_import  # Heavy, load lazily.
  if str(path) == "default":
    model = load_default(dtype, expert_memory_kind)
    tokenizer_lib.set_model_info(model, tokenizer_lib.ModelInfo(
        "default", "default", tokenizer_lib.ByteTokenizer()))
    return model
  directory = pathlib.Path(path)
  if checkpoint.is_checkpoint(directory):
    model = checkpoint.restore(directory, dtype=dtype,
                               expert_memory_kind=expert_memory_kind)
    tokenizer = (tokenizer_lib.ByteTokenizer()
                 if model.config.vocab_size == tokenizer_lib.BYTE_VOCAB
                 else None)
    tokenizer_lib.set_model_info(model, tokenizer_lib.ModelInfo(
        str(directory), "checkpoint", tokenizer))
    return model
  _refuse_non_model(directory, path)
  if expert_memory_kind is not None:
    raise ValueError("expert_memory_kind applies to wisp_jax checkpoints; for "
                     "a Hugging Face directory build a bank with "
                     "wisp_jax.paging.bank.make_bank(model.experts.weights()).")
  model = hf_import.load_hf(directory, dtype=dtype)
  hf = json.loads((directory / "config.json").read_text())
  eos = tokenizer_lib.eos_ids(hf)
  generation = directory / "generation_config.json"
  if not eos and generation.is_file():
    eos = tokenizer_lib.eos_ids(json.loads(generation.read_text()))
  tokenizer_lib.set_model_info(model, tokenizer_lib.ModelInfo(
      str(directory), "huggingface", tokenizer_lib.load_tokenizer(directory),
      eos))
  return model
