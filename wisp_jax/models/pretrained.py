"""`from_pretrained`: a model from a local directory or the shipped default."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from wisp_jax.models.default import load_default
from wisp_jax.models.transformer import MoEModel


def from_pretrained(path, dtype=jnp.float32,
                    expert_memory_kind: str | None = None) -> MoEModel:
  """Loads a model from a local directory.

  Args:
    path: a Hugging Face directory (`config.json` + safetensors) of a
      Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE model, a wisp_jax orbax
      checkpoint (`experiments/train.py` output), or "default" for the
      shipped default model.
    dtype: parameter dtype.
    expert_memory_kind: native checkpoints only: restore the experts into
      this memory kind (e.g. "pinned_host") without passing through device
      memory.

  Returns:
    the `MoEModel`.
  """
  from wisp_jax.models import checkpoint, hf_import  # Heavy, load lazily.
  if str(path) == "default":
    return load_default(dtype, expert_memory_kind)
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"model directory {str(path)!r} does not exist.")
  if checkpoint.is_checkpoint(directory):
    return checkpoint.restore(directory, dtype=dtype,
                              expert_memory_kind=expert_memory_kind)
  if expert_memory_kind is not None:
    raise ValueError("expert_memory_kind applies to wisp_jax checkpoints; for "
                     "a Hugging Face directory build a bank with "
                     "wisp_jax.paging.bank.make_bank(model.experts.weights()).")
  return hf_import.load_hf(directory, dtype=dtype)
