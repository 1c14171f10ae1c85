"""The config of wisp_jax/configs/online.py (its docstring: how to run it)."""
from wisp_jax.configs.online import get_config  # noqa: F401
