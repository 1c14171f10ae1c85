"""A generation request and the checks that make it fail alone."""

from __future__ import annotations

import dataclasses
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
  """
  prompt: Sequence[int]
  max_new_tokens: int
  temperature: float = 0.0
  seed: int = 0
  stop_token: int | None = None
  request_id: Any = None
  arrival_step: int = 0


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
  if request.max_new_tokens < 1:
    return f"max_new_tokens must be >= 1, got {request.max_new_tokens}."
  if request.temperature < 0:
    return f"temperature must be >= 0, got {request.temperature}."
  if prompt.size == 0:
    return "the prompt is empty; a request needs at least one token."
  if prompt.min() < 0 or prompt.max() >= c.vocab_size:
    return (f"prompt token ids must be in [0, {c.vocab_size}), got min "
            f"{prompt.min()}, max {prompt.max()}.")
  if request.stop_token is not None and not (
      0 <= request.stop_token < c.vocab_size):
    return f"stop_token={request.stop_token} is outside [0, {c.vocab_size})."
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
