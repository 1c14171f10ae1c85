"""Serving statistics: per-request results, per-step metrics, summaries.

Per request: time to first token (TTFT), decode tokens/s, end-to-end
latency. Per engine step: one JSON line in `workdir/metrics.jsonl` (batch
size, queue length, KV blocks in use and peak, preemptions, pager traffic).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass
class RequestResult:
  """What the engine produced for one request.

  Attributes:
    request_id: the request's id.
    prompt_length: tokens in the prompt.
    tokens: generated token ids (empty if the request failed; those so far
      if it was cancelled or passed its deadline).
    error: why the request failed, or None.
    finish_reason: "length", "stop", "error", "cancelled" or "deadline"
      (None while it is live).
    arrival_time: clock time the engine received the request (s).
    first_token_time: clock time its first token was sampled (s).
    finish_time: clock time it finished or failed (s).
    arrival_step: engine step it arrived at.
    finish_step: engine step it finished at.
    preemptions: times it was preempted (and later re-prefilled).
  """
  request_id: Any
  prompt_length: int
  tokens: list[int] = dataclasses.field(default_factory=list)
  error: str | None = None
  finish_reason: str | None = None
  arrival_time: float | None = None
  first_token_time: float | None = None
  finish_time: float | None = None
  arrival_step: int | None = None
  finish_step: int | None = None
  preemptions: int = 0

  @property
  def ok(self) -> bool:
    return self.error is None and self.finish_reason is not None

  @property
  def ttft_s(self) -> float | None:
    """Time to first token: arrival to the first sampled token."""
    if self.first_token_time is None or self.arrival_time is None:
      return None
    return self.first_token_time - self.arrival_time

  @property
  def latency_s(self) -> float | None:
    """End to end: arrival to the last token (or the failure)."""
    if self.finish_time is None or self.arrival_time is None:
      return None
    return self.finish_time - self.arrival_time

  @property
  def decode_tokens_per_s(self) -> float | None:
    """Tokens after the first over the time after the first."""
    if (self.finish_time is None or self.first_token_time is None or
        len(self.tokens) < 2):
      return None
    elapsed = self.finish_time - self.first_token_time
    return (len(self.tokens) - 1) / elapsed if elapsed > 0 else None

  def to_json(self) -> dict[str, Any]:
    return {"request_id": self.request_id,
            "prompt_length": self.prompt_length,
            "num_tokens": len(self.tokens), "tokens": list(self.tokens),
            "error": self.error, "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s, "latency_s": self.latency_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "preemptions": self.preemptions,
            "arrival_step": self.arrival_step,
            "finish_step": self.finish_step}


@dataclasses.dataclass(frozen=True)
class StepMetrics:
  """What one engine step did (one line of `metrics.jsonl`).

  Attributes:
    step: engine step number.
    time_s: clock seconds since the engine started.
    step_s: seconds the step took.
    batch_size: requests decoded (0: no decode ran).
    batch_bucket: the decode's padded batch (0 if none).
    prefills: requests prefilled (admitted or readmitted).
    prefill_tokens: tokens those prefills processed.
    decode_context_tokens: key positions the decode rows read.
    queue_length: requests waiting after the step.
    running: requests running after the step.
    kv_blocks: blocks in the KV pool.
    slots_per_layer: expert slots of each layer.
    kv_blocks_in_use: blocks held after the step.
    kv_blocks_step_peak: most blocks held during the step.
    kv_blocks_peak: most blocks ever held.
    preemptions: requests preempted in the step.
    preemptions_total: since the engine started.
    pager_hits: needed experts found on device, all layers.
    pager_misses: needed experts not on device.
    pager_loads: experts copied host -> device.
    pager_bytes: bytes those copies moved.
    faults: steps of this engine step that raised and were recovered
      (see `serving.engine`).
    expired: requests that passed their deadline at the step's start.
  """
  step: int
  time_s: float
  step_s: float
  batch_size: int
  batch_bucket: int
  prefills: int
  prefill_tokens: int
  decode_context_tokens: int
  queue_length: int
  running: int
  kv_blocks: int
  slots_per_layer: tuple[int, ...]
  kv_blocks_in_use: int
  kv_blocks_step_peak: int
  kv_blocks_peak: int
  preemptions: int
  preemptions_total: int
  pager_hits: int
  pager_misses: int
  pager_loads: int
  pager_bytes: int
  faults: int = 0
  expired: int = 0

  def to_json(self) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record["slots_per_layer"] = list(self.slots_per_layer)
    return record


def percentiles(values: Sequence[float | None],
                qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
  """`{"p50": ..., ...}` of the non-None values (None if there are none)."""
  vals = np.asarray([v for v in values if v is not None], np.float64)
  return {f"p{q}": (float(np.percentile(vals, q)) if vals.size else None)
          for q in qs}


def summarize_requests(results: Sequence[RequestResult],
                       wall_s: float) -> dict[str, Any]:
  """Throughput and latency percentiles of a finished workload."""
  done = [r for r in results if r.ok]
  tokens = sum(len(r.tokens) for r in done)
  decode_rates = [r.decode_tokens_per_s for r in done]
  rates = [v for v in decode_rates if v is not None]
  return {
      "num_requests": len(results), "completed": len(done),
      "failed": sum(r.error is not None for r in results),
      "generated_tokens": tokens, "wall_s": wall_s,
      "throughput_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
      "ttft_s": percentiles([r.ttft_s for r in done]),
      "latency_s": percentiles([r.latency_s for r in done]),
      "decode_tokens_per_s": percentiles(decode_rates),
      "decode_tokens_per_s_mean": float(np.mean(rates)) if rates else None,
      "preempted_requests": sum(r.preemptions > 0 for r in results),
  }


class MetricsWriter:
  """Appends one JSON object per line to `workdir/metrics.jsonl`."""

  def __init__(self, workdir: str | pathlib.Path | None,
               name: str = "metrics.jsonl"):
    self.path = None
    self._file = None
    if workdir is not None:
      self.path = pathlib.Path(workdir) / name
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a")

  def write(self, record) -> None:
    """Appends `record` (a dict, or anything with `to_json()`)."""
    if hasattr(record, "to_json"):
      record = record.to_json()
    if self._file is not None:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
