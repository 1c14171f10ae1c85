"""The config of wisp_jax/configs/model_check.py (its docstring: how to run it)."""
from wisp_jax.configs.model_check import get_config  # noqa: F401
