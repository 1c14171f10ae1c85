"""What MV-WSA allocates for: a serving workload and its routing curves.

A `Workload` bundles
  * the model (`MoEConfig`), the accelerator (`HardwareProfile`), weight and
    KV widths and the KV block size: the byte sizes of both pools;
  * request lengths (paired prompt/output samples) and the arrival
    concurrency C (requests that want to run at once): the KV demand;
  * `RoutingCurves`: per-layer LRU misses per decode step for every
    capacity 0..E, measured by `sim.mrc.mattson` at several concurrency
    levels n (how many requests share a decode step), because the expert
    working set of a step grows with the batch (`alloc.curves`).

KV accounting (paged KV, `block_size` positions per block). A request with
prompt p and output o holds ceil((p + t) / BS) blocks at its t-th decode
step. Over the requests' decode lifetimes (time-weighted) this has mean
`held_blocks` and standard deviation `held_blocks_std`; its peak is
ceil((p + o) / BS). n running requests hold n x held_blocks on average.

  floor_blocks   min_concurrency requests of the longest sampled length
                 (max p + o): the admission floor no split may go below.
  demand_blocks  C x held_blocks + z sqrt(C) held_blocks_std (z = 2): enough
                 for C requests with rare preemption; blocks above it buy
                 ~nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from wisp_jax.alloc.curves import RoutingCurves
from wisp_jax.models.config import MoEConfig
from wisp_jax.sim import cost
from wisp_jax.sim.hardware import HardwareProfile, get_profile

DEMAND_Z = 2.0  # demand = mean + DEMAND_Z std of the blocks C requests hold
KV_MODELS = ("simulate", "fluid")


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """A serving workload on one model and accelerator.

  Attributes:
    model: the model's hyperparameters.
    hardware: the accelerator profile (or its name / dict of fields).
    prompt_lens: `[R]` int prompt lengths (samples, paired with outputs).
    output_lens: `[R]` int output lengths (decode tokens), >= 1.
    concurrency: C, requests that want to run at once (arrival
      concurrency); the engine never runs more.
    curves: routing curves of the workload's traffic.
    bytes_per_param: weight width (bf16: 2).
    kv_bytes_per_value: KV width (default: bytes_per_param).
    block_size: token positions per KV block.
    min_concurrency: longest requests that must always fit (KV floor).
    name: for reports.
    kv_model: how the throughput model gets the scheduler's rates where
      the pool binds: "simulate" replays the scheduler (`alloc.kv.simulate`,
      the default), "fluid" uses the closed form `alloc.kv.fluid` (no
      preemption; cheap enough to re-solve online).
  """
  model: MoEConfig
  hardware: HardwareProfile
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  concurrency: int
  curves: RoutingCurves
  bytes_per_param: int = 2
  kv_bytes_per_value: int | None = None
  block_size: int = 16
  min_concurrency: int = 1
  name: str = "workload"
  kv_model: str = "simulate"

  def __post_init__(self):
    object.__setattr__(self, "hardware", get_profile(self.hardware))
    prompt = np.asarray(self.prompt_lens, np.int64).ravel()
    output = np.asarray(self.output_lens, np.int64).ravel()
    if prompt.size == 0 or prompt.shape != output.shape:
      raise ValueError(f"need paired, non-empty prompt/output length "
                       f"samples, got {prompt.size} prompts and "
                       f"{output.size} outputs.")
    if prompt.min() < 1 or output.min() < 1:
      raise ValueError(f"lengths must be >= 1 token, got prompt min "
                       f"{prompt.min()}, output min {output.min()}.")
    object.__setattr__(self, "prompt_lens", prompt)
    object.__setattr__(self, "output_lens", output)
    for name in ("concurrency", "block_size", "min_concurrency",
                 "bytes_per_param"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Workload.{name} must be >= 1, got "
                         f"{getattr(self, name)}.")
    if self.kv_model not in KV_MODELS:
      raise ValueError(f"kv_model must be one of {KV_MODELS}, got "
                       f"{self.kv_model!r}.")
    if self.min_concurrency > self.concurrency:
      raise ValueError(f"min_concurrency={self.min_concurrency} exceeds "
                       f"concurrency={self.concurrency}.")
    shape = (self.model.num_layers, self.model.num_experts)
    if (self.curves.num_layers, self.curves.num_experts) != shape:
      raise ValueError(
          f"routing curves are for L={self.curves.num_layers}, E="
          f"{self.curves.num_experts} but {self.model.name} has L={shape[0]},"
          f" E={shape[1]}; record or generate the trace for this model.")
    if self.curves.top_k != self.model.top_k:
      raise ValueError(f"routing curves have top_k={self.curves.top_k}, "
                       f"{self.model.name} has {self.model.top_k}.")
    blocks = self._held_blocks_moments()
    object.__setattr__(self, "_held", blocks)

  # Byte sizes.
  @property
  def expert_bytes(self) -> int:
    return cost.expert_bytes(self.model, self.bytes_per_param)

  @property
  def dense_bytes(self) -> int:
    return cost.dense_bytes(self.model, self.bytes_per_param)

  @property
  def kv_width(self) -> int:
    return self.kv_bytes_per_value or self.bytes_per_param

  @property
  def block_bytes(self) -> int:
    return self.block_size * cost.kv_bytes_per_token(self.model,
                                                     self.kv_width)

  # Lengths and KV demand.
  def _held_blocks_moments(self) -> tuple[float, float, float]:
    """Time-weighted mean and std of blocks held, and mean context."""
    total = sq = ctx = 0.0
    steps = int(self.output_lens.sum())
    bs = self.block_size
    for p, o in zip(self.prompt_lens.tolist(), self.output_lens.tolist()):
      positions = p + np.arange(1, o + 1)
      held = -(-positions // bs)
      total += held.sum()
      sq += np.square(held, dtype=np.float64).sum()
      ctx += positions.sum()
    mean = total / steps
    return mean, math.sqrt(max(sq / steps - mean**2, 0.0)), ctx / steps

  @property
  def held_blocks(self) -> float:
    """Mean blocks a running request holds (time-weighted)."""
    return self._held[0]

  @property
  def held_blocks_std(self) -> float:
    """Standard deviation of the blocks a running request holds."""
    return self._held[1]

  @property
  def mean_context(self) -> float:
    """Mean tokens of KV a decode step reads per request."""
    return self._held[2]

  @property
  def mean_output(self) -> float:
    return float(self.output_lens.mean())

  @property
  def max_len(self) -> int:
    """Longest sampled request, prompt + output tokens."""
    return int((self.prompt_lens + self.output_lens).max())

  @property
  def peak_blocks(self) -> float:
    """Mean over requests of the blocks held at their last token."""
    return float(np.mean(-(-(self.prompt_lens + self.output_lens)
                           // self.block_size)))

  @property
  def floor_blocks(self) -> int:
    """The KV admission floor: min_concurrency longest requests."""
    return self.min_concurrency * -(-self.max_len // self.block_size)

  def demand_blocks(self, concurrency: float | None = None) -> int:
    """Blocks for `concurrency` (default C) requests with rare preemption."""
    n = self.concurrency if concurrency is None else concurrency
    return max(self.floor_blocks, math.ceil(
        n * self.held_blocks + DEMAND_Z * math.sqrt(n) * self.held_blocks_std))

  def summary(self) -> dict[str, Any]:
    """Scalars describing the workload, for reports."""
    return {
        "name": self.name, "model": self.model.name,
        "hardware": self.hardware.name, "concurrency": self.concurrency,
        "mean_prompt": float(self.prompt_lens.mean()),
        "mean_output": self.mean_output, "max_len": self.max_len,
        "block_size": self.block_size, "block_bytes": self.block_bytes,
        "expert_bytes": self.expert_bytes, "dense_bytes": self.dense_bytes,
        "held_blocks": self.held_blocks, "peak_blocks": self.peak_blocks,
        "floor_blocks": self.floor_blocks,
        "demand_blocks": self.demand_blocks(),
        "curve_levels": self.curves.concurrency.tolist(),
        "curves_source": self.curves.source}


def sample_lengths(num: int, prompt_range: tuple[int, int],
                   output_range: tuple[int, int], seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`num` prompt and output lengths, each uniform in its inclusive range."""
  for name, (low, high) in (("prompt", prompt_range),
                            ("output", output_range)):
    if not 1 <= low <= high:
      raise ValueError(f"{name} length range needs 1 <= low <= high, got "
                       f"({low}, {high}).")
  rng = np.random.default_rng(seed)
  return (rng.integers(prompt_range[0], prompt_range[1] + 1, num),
          rng.integers(output_range[0], output_range[1] + 1, num))
