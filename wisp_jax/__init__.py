"""wisp_jax: working-set expert paging for MoE inference in JAX/Flax.

Public surface:

  model = wisp_jax.from_pretrained(path, dtype=jnp.float32)
  logits = model(tokens)                                   # [B, T, V]
  out = wisp_jax.generate(model, prompts, max_new_tokens=64,
                          experts="paged", slots_per_layer=4, policy="lru")
  out.tokens, out.logits, out.stats

Shape legend used everywhere: B batch, T time, D model, F expert ffn,
E experts, K top-k, L layers, S slots, H heads (see wisp_jax.models.moe).
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names and the module each lives in; imported on first use, so that
# host-only modules (e.g. `wisp_jax.serving.scheduler`) load without JAX.
_PUBLIC = {
    "MoEConfig": "wisp_jax.models.config",
    "PRESETS": "wisp_jax.models.config",
    "get_config": "wisp_jax.models.config",
    "MoEModel": "wisp_jax.models.transformer",
    "load_default": "wisp_jax.models.default",
    "from_pretrained": "wisp_jax.models.pretrained",
    "GenerateOutput": "wisp_jax.serving.generate",
    "generate": "wisp_jax.serving.generate",
    "ExpertStats": "wisp_jax.paging.api",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
  if name not in _PUBLIC:
    raise AttributeError(f"module 'wisp_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_PUBLIC))
