"""The config of wisp_jax/configs/prefetch.py (its docstring: how to run it)."""
from wisp_jax.configs.prefetch import get_config  # noqa: F401
