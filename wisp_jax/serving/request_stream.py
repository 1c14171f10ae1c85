"""Serving workloads: real-text prompts, arrival patterns, JSON-lines files.

Prompts are windows of held-out Python standard library source (the corpus
of `wisp_jax.data`), as byte tokens: every machine that runs Python has
them. A model whose vocabulary is smaller than 256 (the `tiny` preset) reads
each byte modulo its vocabulary size.

Arrivals are counted in engine steps: `all` (every request at step 0) or
`poisson` (a Poisson process of `rate` requests per step).

A workload file has one JSON object per line:

  {"prompt": "def f(x):\\n", "max_new_tokens": 32}
  {"tokens": [100, 101, 102], "max_new_tokens": 8, "arrival_step": 3,
   "temperature": 0.7, "seed": 1, "stop_token": 10, "request_id": "r1"}
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from wisp_jax import data
from wisp_jax.serving.request import Request

ARRIVALS = ("all", "poisson")
_OPTIONAL = ("temperature", "seed", "stop_token", "request_id",
             "arrival_step")


def text_tokens(text: str | bytes, vocab_size: int) -> np.ndarray:
  """Byte tokens of `text` (modulo `vocab_size` when it is below 256)."""
  raw = text.encode("utf-8") if isinstance(text, str) else text
  tokens = np.frombuffer(raw, np.uint8).astype(np.int32)
  return tokens % vocab_size if vocab_size < 256 else tokens


def stdlib_prompts(num_prompts: int, min_len: int, max_len: int,
                   vocab_size: int, seed: int = 0) -> list[np.ndarray]:
  """Prompts cut from held-out stdlib files, each starting at a line.

  Args:
    num_prompts: how many.
    min_len: shortest prompt in tokens (bytes).
    max_len: longest prompt in tokens.
    vocab_size: the model's vocabulary size.
    seed: same seed, same prompts.

  Returns:
    `num_prompts` int32 token arrays with lengths uniform in
    `[min_len, max_len]`.
  """
  if not 1 <= min_len <= max_len:
    raise ValueError(f"prompt lengths need 1 <= min_len <= max_len, got "
                     f"{min_len}, {max_len}.")
  corpus = data.load_corpus(max_train_bytes=1,
                            max_val_bytes=max(200_000, 8 * max_len))
  text = corpus.validation
  if text.size < 2 * max_len:
    raise ValueError(f"the held-out corpus has {text.size} bytes, too few "
                     f"for prompts of {max_len}.")
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_len, max_len + 1, size=num_prompts)
  prompts = []
  for length in lengths:
    start = int(rng.integers(0, text.size - 2 * max_len))
    newline = np.flatnonzero(text[start:start + max_len] == ord("\n"))
    if newline.size:
      start += int(newline[0]) + 1
    window = text[start:start + int(length)].astype(np.int32)
    prompts.append(window % vocab_size if vocab_size < 256 else window)
  return prompts


def arrival_steps(num_requests: int, arrival: str, rate: float,
                  seed: int = 0) -> np.ndarray:
  """Engine step of each request's arrival (`[num_requests]` int)."""
  if arrival == "all":
    return np.zeros((num_requests,), np.int64)
  if arrival == "poisson":
    if rate <= 0:
      raise ValueError(f"poisson arrivals need rate > 0 requests per step, "
                       f"got {rate}.")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=num_requests)
    return np.floor(np.cumsum(gaps) - gaps[0]).astype(np.int64)
  raise ValueError(f"unknown arrival pattern {arrival!r}; use one of "
                   f"{', '.join(ARRIVALS)}.")


def synthetic_workload(num_requests: int, prompt_len: tuple[int, int],
                       max_new_tokens: tuple[int, int], arrival: str,
                       rate: float, vocab_size: int, temperature: float = 0.0,
                       seed: int = 0) -> list[Request]:
  """Stdlib-text requests with random lengths and the given arrivals."""
  prompts = stdlib_prompts(num_requests, *prompt_len, vocab_size, seed)
  rng = np.random.default_rng(seed + 1)
  low, high = max_new_tokens
  if not 1 <= low <= high:
    raise ValueError(f"max_new_tokens range must satisfy 1 <= min <= max, "
                     f"got {low}, {high}.")
  new_tokens = rng.integers(low, high + 1, size=num_requests)
  steps = arrival_steps(num_requests, arrival, rate, seed + 2)
  return [Request(prompt, int(n), temperature=temperature, seed=seed + i,
                  request_id=i, arrival_step=int(step))
          for i, (prompt, n, step) in enumerate(zip(prompts, new_tokens,
                                                    steps))]


def _request_from_json(obj: Any, line: int, vocab_size: int) -> Request:
  if not isinstance(obj, dict):
    raise ValueError(f"workload line {line}: expected a JSON object, got "
                     f"{type(obj).__name__}.")
  if ("prompt" in obj) == ("tokens" in obj):
    raise ValueError(f"workload line {line}: give exactly one of 'prompt' "
                     f"(text) or 'tokens' (ids).")
  if "max_new_tokens" not in obj:
    raise ValueError(f"workload line {line}: 'max_new_tokens' is missing.")
  unknown = set(obj) - {"prompt", "tokens", "max_new_tokens", *_OPTIONAL}
  if unknown:
    raise ValueError(f"workload line {line}: unknown fields "
                     f"{sorted(unknown)}.")
  prompt = (text_tokens(obj["prompt"], vocab_size) if "prompt" in obj else
            np.asarray(obj["tokens"], np.int64))
  kwargs = {k: obj[k] for k in _OPTIONAL if k in obj}
  kwargs.setdefault("request_id", line - 1)
  return Request(prompt, int(obj["max_new_tokens"]), **kwargs)


def load_jsonl(path: str | pathlib.Path, vocab_size: int) -> list[Request]:
  """Reads a JSON-lines workload file (see the module docstring)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"workload file {path} does not exist.")
  requests = []
  for number, text in enumerate(path.read_text().splitlines(), start=1):
    if not text.strip():
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"workload line {number} of {path} is not JSON: "
                       f"{e}.") from None
    requests.append(_request_from_json(obj, number, vocab_size))
  if not requests:
    raise ValueError(f"workload file {path} has no requests.")
  return requests
