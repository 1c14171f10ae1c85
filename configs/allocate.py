"""The config of wisp_jax/configs/allocate.py (its docstring: how to run it)."""
from wisp_jax.configs.allocate import get_config  # noqa: F401
