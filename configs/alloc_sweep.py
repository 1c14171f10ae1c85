"""The config of wisp_jax/configs/alloc_sweep.py (its docstring: how to run it)."""
from wisp_jax.configs.alloc_sweep import get_config  # noqa: F401
