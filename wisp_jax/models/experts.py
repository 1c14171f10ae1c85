"""The expert-source interface: how an MoE block obtains expert weights.

The model knows nothing of paging. Each MoE block hands its tokens and
routed ids to an `ExpertSource`, which returns the `[N, K, D]` expert
outputs computed with `moe.expert_ffn` and threads an opaque `carry`
(slot buffers, pager state, byte counters) through the layers. Resident,
static-offload, transient and paged sources implement the same interface,
so every mode runs the same model code.
"""

from __future__ import annotations

import abc
from typing import Any

import jax

from wisp_jax.models import moe


class ExpertSource(abc.ABC):
  """Provides the routed experts' outputs to the MoE blocks."""

  @abc.abstractmethod
  def __call__(self, layer: int, x: jax.Array, ids: jax.Array,
               carry: Any) -> tuple[jax.Array, Any]:
    """Runs `x` through the experts `ids` of `layer`.

    Args:
      layer: static layer index.
      x: `[N, D]` normalised tokens.
      ids: `[N, K]` int32 routed expert ids.
      carry: the source's state, threaded through layers and steps.

    Returns:
      `[N, K, D]` expert outputs and the new carry.
    """


class ResidentSource(ExpertSource):
  """All experts on device: the reference every other source must equal."""

  def __init__(self, experts: moe.ExpertWeights):
    self.experts = experts  # [L, E, ...]

  def __call__(self, layer, x, ids, carry):
    return moe.expert_ffn(x, self.experts.layer(layer), ids), carry


class SourceSpec(abc.ABC):
  """Static (hashable) description of a source; `build` binds its arrays.

  Jitted steps take the spec as a static argument and the arrays (device
  experts, host bank) and carry as traced arguments, so one compiled step
  serves every call with the same shapes.
  """

  @abc.abstractmethod
  def build(self, arrays: Any) -> ExpertSource:
    """Returns the source that reads `arrays` inside a traced step."""

