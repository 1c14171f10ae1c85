"""The expert-source interface: how an MoE block obtains its experts' outputs.

The model knows nothing of paging. In every layer the MoE block hands its
tokens and routed ids to an `ExpertSource`, which returns the `[N, K, D]`
expert outputs computed with `moe.expert_ffn` (see its exactness rule) and
threads an opaque `carry` (slot buffers, pager state, traffic counters)
through the layers and steps. Resident, static-offload, transient and
paged sources implement the same interface, so every mode runs the same
layer body; they differ only in the table of weights they hand to
`expert_ffn`.

A `SourceSpec` is the static (hashable, jit-static) description of a
source. It builds the source inside a traced step and owns everything that
knows the carry's layout: counters, and for the pager its state and its
resizing. Nothing outside the source's own package reads the carry.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol

import jax

from wisp_jax.models import moe


class ExpertSource(Protocol):
  """Provides the routed experts' outputs to the MoE blocks."""

  def layer(self, layer, x: jax.Array, ids: jax.Array,
            carry: Any) -> tuple[jax.Array, Any]:
    """Runs `x` through the experts `ids` of `layer`.

    Args:
      layer: layer index, a traced int32 scalar inside the layer loop (a
        Python int when the layers are unrolled).
      x: `[N, D]` normalised tokens.
      ids: `[N, K]` int32 routed expert ids.
      carry: the source's state, threaded through layers and steps.

    Returns:
      `[N, K, D]` expert outputs (straight from `moe.expert_ffn`) and the
      new carry.
    """

  def end_step(self, carry: Any) -> Any:
    """Called once per forward pass, after the last layer (e.g. the
    pager's step tick)."""


class ResidentSource:
  """All experts on device: the reference every other source must equal.

  Its carry is passed through untouched (None in `MoEModel.__call__`).
  A bf16 table is read as its stored bits (`moe.as_bits`; inside a jitted
  step that is one copy of the table, in `uint16`).
  """

  def __init__(self, experts: moe.ExpertWeights):
    self.experts = jax.tree.map(moe.as_bits, experts)  # [L, E, ...]

  def layer(self, layer, x, ids, carry):
    out = moe.expert_ffn(x, self.experts, ids,
                         num_experts=self.experts.gate.shape[1], layer=layer)
    return out, carry

  def end_step(self, carry):
    return carry


class SourceSpec(abc.ABC):
  """Static description of a source; `build` binds its arrays.

  Jitted steps take the spec as a static argument and the arrays (device
  experts, host bank) and carry as traced arguments, so one compiled step
  serves every call with the same shapes.
  """

  name: str

  @abc.abstractmethod
  def build(self, arrays: Any) -> ExpertSource:
    """Returns the source that reads `arrays` inside a traced step."""

  @abc.abstractmethod
  def counters(self, carry: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cumulative `(hits, misses, loads)`, each `[L]` int32, of a carry."""
