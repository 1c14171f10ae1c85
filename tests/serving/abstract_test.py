"""Real-size decode steps compiled from shapes (wisp_jax/serving/abstract.py):
no per-token weight copies, and a program that does not grow with depth."""

import jax.numpy as jnp
import pytest

from wisp_jax.models.config import get_config
from wisp_jax.serving import abstract


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("experts", ["resident", "paged"])
@pytest.mark.parametrize("batch", [1, 32])
def test_real_size_step_temporaries_below_one_slot_table(preset, experts,
                                                         batch):
  # float32: XLA:CPU has no bf16 matmul and, at bf16, hoists an f32 copy of
  # every stacked dense weight out of the layer loop (a backend artefact
  # this check is not about); at f32 the temporaries are the program's own.
  config = get_config(preset)
  step = abstract.lower_decode_step(config, experts, batch, dtype=jnp.float32)
  # One layer's slot table at S = E/2; the old per-(token, k) gather needed
  # batch x K experts' weights (45 GB for a 64-token Mixtral chunk).
  assert step.temp_bytes < step.slot_table_bytes, step
  # At most the three projections of one expert in flight, plus activations.
  assert step.temp_bytes < 1.2 * step.expert_bytes + 2**28, step


def test_step_program_does_not_grow_with_depth():
  shallow = get_config("qwen3-30b-a3b-small").replace(num_layers=4)
  lines = {layers: abstract.lower_decode_step(
      shallow.replace(num_layers=layers), "paged", 2,
      cache_len=64).hlo_lines for layers in (4, 48)}
  assert lines[4] == lines[48], lines
  unrolled = {layers: abstract.lower_decode_step(
      shallow.replace(num_layers=layers, unroll_layers=True), "paged", 2,
      cache_len=64).hlo_lines for layers in (1, 2)}
  # Unrolled (debugging), every layer adds its own copy of the body.
  assert unrolled[2] > 1.5 * unrolled[1]
