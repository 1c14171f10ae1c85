"""Builders shared by the alloc tests: the `tiny` model on a toy device."""

import numpy as np

from wisp_jax.alloc.curves import RoutingCurves
from wisp_jax.alloc.workload import Workload
from wisp_jax.models.config import get_config

# Round numbers: paging one tiny expert (2880 bytes) takes 2.88 ms.
TOY_DEVICE = {"name": "toy", "h2d_bytes_per_s": 1e6,
              "hbm_bytes_per_s": 1e9, "bf16_flops": 1e12,
              "memory_bytes": 2**30}


def make_workload(misses, concurrency=1, levels=None, prompt=8, output=8,
                  block_size=4, refs=None, **kwargs) -> Workload:
  """A `tiny` (L=2, E=6, K=2) workload with hand-made curves.

  Args:
    misses: `[L, E + 1]` (one level) or `[N, L, E + 1]` misses per step.
    concurrency: C.
    levels: `[N]` concurrency of each level (default 1..N).
    prompt, output: every request's lengths (ints) or samples (arrays).
    block_size: KV block size.
    refs: `[N, L]` references per step (default misses at capacity 0).
    **kwargs: other `Workload` fields.
  """
  misses = np.asarray(misses, np.float64)
  if misses.ndim == 2:
    misses = misses[None]
  levels = np.arange(1, misses.shape[0] + 1) if levels is None else levels
  refs = misses[:, :, 0] if refs is None else refs
  curves = RoutingCurves(concurrency=np.asarray(levels, np.float64),
                         misses_per_step=misses, references_per_step=refs,
                         top_k=2, source="hand-made")
  prompt = np.broadcast_to(np.asarray(prompt), (16,))
  output = np.broadcast_to(np.asarray(output), prompt.shape)
  return Workload(model=get_config("tiny"), hardware=TOY_DEVICE,
                  prompt_lens=prompt, output_lens=output,
                  concurrency=concurrency, curves=curves,
                  block_size=block_size, **kwargs)


def random_workload(seed: int, concurrency: int = 4) -> Workload:
  """A `tiny` workload with random non-increasing curves at 1..C."""
  rng = np.random.default_rng(seed)
  levels = np.arange(1, concurrency + 1)
  drops = rng.exponential(1.0, (concurrency, 2, 6))
  drops *= levels[:, None, None] ** 0.7  # wider working set with n
  misses = np.concatenate([np.cumsum(drops[..., ::-1], axis=-1)[..., ::-1],
                           np.zeros((concurrency, 2, 1))], axis=-1)
  prompt = rng.integers(4, 40, 16)
  output = rng.integers(4, 40, 16)
  return make_workload(misses, concurrency, levels, prompt, output)
