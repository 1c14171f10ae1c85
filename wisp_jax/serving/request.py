"""A generation request and the checks that make it fail alone.

Every field is checked before the request is queued (`validate_request`),
so a request that would raise later (a seed that does not fit the step's
uint32, a float token count, an unhashable id) fails alone at submission
with the field, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import numpy as np

from wisp_jax.models.config import MoEConfig
from wisp_jax.serving import blocks


@dataclasses.dataclass
class Request:
  """One generation request.

  Attributes:
    prompt: token ids.
    max_new_tokens: tokens to generate (fewer if `stop_token` comes first).
    temperature: 0 for greedy, > 0 to sample.
    seed: sampling seed.
    stop_token: generation ends after this token, if given.
    request_id: any hashable id; the engine numbers requests without one.
    arrival_step: engine step (from the start of `Engine.run`) at which the
      request arrives.
    deadline_s: seconds from its arrival (the engine's clock) by which the
      request must finish, or None; checked at the start of each step, an
      expired request finishes with finish_reason "deadline" and its
      tokens so far.
  """
  prompt: Sequence[int]
  max_new_tokens: int
  temperature: float = 0.0
  seed: int = 0
  stop_token: int | None = None
  request_id: Any = None
  arrival_step: int = 0
  deadline_s: float | None = None


def prompt_array(prompt) -> tuple[np.ndarray, str | None]:
  """The prompt as a 1-D int64 array, or an empty one and why not."""
  try:
    array = np.asarray(prompt)
    if array.size and not np.issubdtype(array.dtype, np.integer):
      raise TypeError(f"dtype {array.dtype}")
    return array.astype(np.int64).reshape(-1), None
  except (TypeError, ValueError) as e:
    return np.zeros((0,), np.int64), (
        f"the prompt must be a sequence of integer token ids ({e}).")


def validate_request(request: Request, prompt: np.ndarray, config: MoEConfig,
                     block_size: int, num_blocks: int) -> str | None:
  """Why `request` cannot be served by an engine, or None if it can.

  Args:
    request: the request.
    prompt: its prompt as a 1-D integer array.
    config: the model's config.
    block_size: token positions per KV block.
    num_blocks: blocks in the engine's KV pool.
  """
  c = config
  error = id_error(request) or _field_error(request, config)
  if error is not None:
    return error
  if prompt.size == 0:
    return "the prompt is empty; a request needs at least one token."
  if prompt.min() < 0 or prompt.max() >= c.vocab_size:
    return (f"prompt token ids must be in [0, {c.vocab_size}), got min "
            f"{prompt.min()}, max {prompt.max()}.")
  total = prompt.size + request.max_new_tokens
  if total > c.max_seq_len:
    return (f"prompt length {prompt.size} + max_new_tokens "
            f"{request.max_new_tokens} = {total} exceeds the model's "
            f"max_seq_len={c.max_seq_len}.")
  # The last token is never written to the pool.
  need = blocks.blocks_for(total - 1, block_size)
  if need > num_blocks:
    return (f"the request needs {need} KV blocks of {block_size} positions "
            f"({total - 1} positions) but the pool has {num_blocks}.")
  return None


def _is_int(value) -> bool:
  """An integer that is not a bool (Python or NumPy)."""
  return (isinstance(value, numbers.Integral) and
          not isinstance(value, (bool, np.bool_)))


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and
          not isinstance(value, (bool, np.bool_)))


def _field_error(request: Request, config: MoEConfig) -> str | None:
  """Why a field other than the prompt and the id is invalid, or None."""
  r, vocab = request, config.vocab_size
  if not _is_int(r.max_new_tokens) or r.max_new_tokens < 1:
    return (f"max_new_tokens must be an integer >= 1, got "
            f"{r.max_new_tokens!r}.")
  if not _is_real(r.temperature) or not (
      math.isfinite(r.temperature) and r.temperature >= 0):
    return (f"temperature must be a finite number >= 0 (0 for greedy), got "
            f"{r.temperature!r}.")
  if not _is_int(r.seed) or not 0 <= r.seed < 2**32:
    return f"seed must be an integer in [0, 2**32), got {r.seed!r}."
  if r.stop_token is not None and not (_is_int(r.stop_token) and
                                       0 <= r.stop_token < vocab):
    return (f"stop_token must be None or an integer token id in [0, "
            f"{vocab}), got {r.stop_token!r}.")
  if not _is_int(r.arrival_step) or r.arrival_step < 0:
    return (f"arrival_step must be an integer >= 0, got "
            f"{r.arrival_step!r}.")
  if r.deadline_s is not None and not (_is_real(r.deadline_s) and
                                       r.deadline_s > 0):
    return (f"deadline_s must be None or a number of seconds > 0, got "
            f"{r.deadline_s!r}.")
  return None


def id_error(request: Request) -> str | None:
  """Why `request.request_id` cannot key the engine's results, or None."""
  try:
    hash(request.request_id)
  except TypeError:
    return (f"request_id must be hashable (a str or an int, say), got "
            f"{type(request.request_id).__name__} {request.request_id!r}.")
  return None


def arrival_of(request: Request) -> int:
  """The request's arrival step for ordering (0 if it is invalid: such a
  request arrives at once and fails validation)."""
  step = request.arrival_step
  return int(step) if _is_int(step) and step >= 0 else 0
