"""The shipped default model: a byte-level MoE trained on the stdlib corpus.

`wisp_jax/assets/default/` holds the orbax checkpoint written by
`experiments/train.py --config=configs/train_default.py` (see that config's
docstring) and the run's `summary.json`. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp

from wisp_jax.models import checkpoint
from wisp_jax.models.transformer import MoEModel

DEFAULT_CHECKPOINT = (pathlib.Path(__file__).resolve().parent.parent /
                      "assets" / "default")
SUMMARY_FILE = "summary.json"

_HOW_TO_PRODUCE = (
    "Produce it with\n"
    "  .venv/bin/python experiments/train.py "
    "--config=configs/train_default.py --workdir=workdirs/train_default\n"
    "  cp -r workdirs/train_default/checkpoint wisp_jax/assets/default\n"
    "  cp workdirs/train_default/summary.json wisp_jax/assets/default/")


def _check_present() -> None:
  if not (DEFAULT_CHECKPOINT / checkpoint.CONFIG_FILE).exists():
    raise FileNotFoundError(
        f"the default model checkpoint is missing from {DEFAULT_CHECKPOINT}. "
        + _HOW_TO_PRODUCE)


def load_default(dtype=jnp.float32,
                 expert_memory_kind: str | None = None) -> MoEModel:
  """Restores the shipped default model.

  Args:
    dtype: dtype of the restored weights (stored as bfloat16).
    expert_memory_kind: memory kind of the experts, e.g. "pinned_host";
      default device memory if None.

  Returns:
    the `MoEModel` (config: the "default" preset).
  """
  _check_present()
  return checkpoint.restore(DEFAULT_CHECKPOINT, dtype=dtype,
                            expert_memory_kind=expert_memory_kind)


def default_summary() -> dict[str, Any]:
  """The training run's summary shipped with the checkpoint.

  Keys include `val_bits_per_byte`, `expert_entropy_bits` (per layer),
  `train_time_s`, `steps` and `tokens_seen`.
  """
  _check_present()
  return json.loads((DEFAULT_CHECKPOINT / SUMMARY_FILE).read_text())
