"""Experiment configs: one module per experiment, each with `get_config(arg)`.

Loadable by name from Python (a notebook) or by path from the command line:

  config = wisp_jax.configs.get("simulate", "tiny")
  .venv/bin/python experiments/simulate.py \
      --config=configs/simulate.py:tiny --workdir=workdirs/simulate_tiny

(`configs/X.py` at the top of the repository re-exports
`wisp_jax.configs.X.get_config`, so both spellings load this code.)

The argument after the colon means the same in every config:

  ''        the full run.
  'tiny'    a CI-speed run of the same experiment, with the smallest sizes
            that still exercise every code path: the `tiny` model preset
            (L=2, E=6, K=2) where any model will do, the shipped
            byte-level default model (or, to train, a 2-layer byte-level
            one) where the experiment needs its weights, vocabulary or
            recorded routing (simulate: E=8, as its recorded trace), a
            workload of a few requests.

Each docstring says how long its runs took, and on what machine.

Some configs take more arguments (listed in their docstrings); any other
argument raises a ValueError naming the valid ones. Every field,
sequences included, can be overridden on the command line: sequences are
tuples (`--config.budgets_gib=8,16`; strings as a literal,
`--config.rules="('mv',)"`) or comma-separated strings.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Sequence

import ml_collections

TINY = "tiny"
FULL = ""
_MEANING = {FULL: "the full run", TINY: "a CI-speed run"}


def names() -> list[str]:
  """Names of the configs in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if not m.name.startswith("_"))


def get(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config `name` (a module of this package) for `arg`.

  Args:
    name: e.g. "simulate", "serve" (see `names()`).
    arg: "" or None (the full run), "tiny", or a config's own argument.

  Returns:
    the `ml_collections.ConfigDict`.
  """
  if name not in names():
    raise ValueError(f"unknown config {name!r}; known configs: "
                     f"{', '.join(names())}.")
  module = importlib.import_module(f"{__name__}.{name}")
  return module.get_config(arg)


def check_arg(name: str, arg: str | None,
              extra: Sequence[str] = (), more: str = "") -> str:
  """`arg` if it is '', 'tiny' or one of `extra`; else a ValueError.

  Args:
    name: the config's name, for the message.
    arg: the argument given after the colon.
    extra: the config's own arguments besides '' and 'tiny'.
    more: a phrase for arguments not listed (e.g. "a model preset name").

  Returns:
    `arg`, with None read as ''.
  """
  arg = arg or FULL
  valid = [FULL, TINY, *extra]
  if arg in valid:
    return arg
  listed = ", ".join(
      f"{v!r}" + (f" ({_MEANING[v]})" if v in _MEANING else "")
      for v in valid)
  raise ValueError(f"unknown argument {arg!r} for config {name!r}; valid: "
                   f"{listed}" + (f", or {more}" if more else "") + ".")


def split_names(value) -> tuple[str, ...]:
  """Names from a tuple/list or a comma-separated string."""
  if isinstance(value, str):
    return tuple(v.strip() for v in value.split(",") if v.strip())
  return tuple(value)
