"""The config of wisp_jax/configs/record.py (its docstring: how to run it)."""
from wisp_jax.configs.record import get_config  # noqa: F401
